//! Calibration files: streamed accumulation equals the in-memory computation, windows
//! round-trip, corruption is detected, and the fit uses them.

use tpla::attention::reference::normalise;
use tpla::calibration::{
    fit_layer, synthetic_layer_calibration, synthetic_layers, write_synthetic, CalibrationFile,
    CalibrationShape, CalibrationWriter, FitOptions, LayerCalibration, SyntheticCalibration,
};
use tpla::transform::{MuPolicy, SecondMoment, SliceLayout, Transform, TransformKind};
use tpla::{ErrorKind, ModelDims};

fn dims() -> ModelDims {
    ModelDims::new(4, 64, 16, 32, 32, 0.15).unwrap()
}

fn f32s(v: &[f64]) -> Vec<f32> {
    v.iter().map(|&x| x as f32).collect()
}

#[test]
fn streamed_second_moment_and_pca_equal_the_in_memory_ones() {
    let d = dims();
    let layers = synthetic_layers(&d, 3, 7).unwrap();
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("cal.bin");
    let mut w = CalibrationWriter::create(&path, CalibrationShape::new(&d, 3).unwrap()).unwrap();
    // Layer 1's latents arrive in three records (one longer than the 256-row read
    // chunk), interleaved with the other layers' records, as an engine would write them.
    let seqs: Vec<Vec<f32>> = layers
        .iter()
        .map(|l| f32s(&l.sequence(900, 3).tokens.latents))
        .collect();
    let cut = |v: &[f32], a: usize, b: usize| v[a * d.d_c..b * d.d_c].to_vec();
    w.latents(1, &cut(&seqs[1], 0, 300)).unwrap();
    w.latents(0, &cut(&seqs[0], 0, 900)).unwrap();
    w.latents(1, &cut(&seqs[1], 300, 301)).unwrap();
    let (_, window) = synthetic_layer_calibration(
        &layers[2],
        &SyntheticCalibration {
            tokens: 1,
            window: 40,
            queries: 3,
            seed: 9,
        },
    )
    .unwrap();
    w.window(
        2,
        &f32s(&window.latents),
        &f32s(&window.k_rope),
        &f32s(&window.q_nope),
        &f32s(&window.q_rope),
    )
    .unwrap();
    w.latents(1, &cut(&seqs[1], 301, 900)).unwrap();
    w.finish().unwrap();

    let file = CalibrationFile::open(&path).unwrap();
    assert_eq!(file.shape().layers, 3);
    assert_eq!(
        (
            file.latent_tokens(0),
            file.latent_tokens(1),
            file.latent_tokens(2)
        ),
        (900, 900, 0)
    );
    assert_eq!((file.window_count(1), file.window_count(2)), (0, 1));
    for (l, seq) in seqs.iter().enumerate().take(2) {
        let mut want = SecondMoment::new(d.d_c);
        for a in seq.chunks_exact(d.d_c) {
            let a: Vec<f64> = a.iter().map(|&x| x as f64).collect();
            want.add(&normalise(&a)).unwrap();
        }
        let got = file.moment(l).unwrap();
        assert!(got == want, "layer {l}: streamed moment differs");
        for layout in [SliceLayout::Contiguous, SliceLayout::Interleaved] {
            let a = Transform::pca(&got, layout, 4).unwrap();
            let b = Transform::pca(&want, layout, 4).unwrap();
            assert_eq!(a.matrix(), b.matrix());
            assert_eq!(a.fingerprint(), b.fingerprint());
        }
    }
    assert_eq!(file.moment(2).unwrap().count(), 0);
    // The window comes back as written (f32 values).
    let got = file.window(2, 0).unwrap();
    let round = |v: &[f64]| -> Vec<f64> { v.iter().map(|&x| x as f32 as f64).collect() };
    assert_eq!(got.latents, round(&window.latents));
    assert_eq!(got.k_rope, round(&window.k_rope));
    assert_eq!(got.q_nope, round(&window.q_nope));
    assert_eq!(got.q_rope, round(&window.q_rope));
    assert_eq!(got.tokens(d.d_c), 40);
    assert_eq!(file.window(2, 1).unwrap_err().kind(), ErrorKind::OutOfRange);
    assert_eq!(file.moment(3).unwrap_err().kind(), ErrorKind::OutOfRange);
}

#[test]
fn fit_uses_the_file_and_kl_beats_one_on_its_window() {
    let d = dims();
    let layers = synthetic_layers(&d, 1, 17).unwrap();
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("cal.bin");
    let spec = SyntheticCalibration {
        tokens: 2000,
        window: 500,
        queries: 2,
        seed: 5,
    };
    write_synthetic(&path, &layers, &spec).unwrap();
    let file = CalibrationFile::open(&path).unwrap();
    let cal = LayerCalibration::from_file(&file, 0).unwrap();
    assert_eq!(cal.moment.count(), 2000);
    let opts = |transform, policy| FitOptions {
        transform,
        layout: SliceLayout::Contiguous,
        groups: 4,
        policy,
        hadamard_seed: 1,
    };
    let pca = fit_layer(
        &layers[0].weights,
        Some(&cal),
        &opts(TransformKind::Pca, MuPolicy::Variance),
        0,
    )
    .unwrap();
    // Contiguous PCA slices are ordered by energy; variance mu is total over slice.
    assert!(
        pca.fractions.windows(2).all(|f| f[0] >= f[1]),
        "{:?}",
        pca.fractions
    );
    for (m, f) in pca.mus.iter().zip(&pca.fractions) {
        assert!((m * f - 1.0).abs() < 1e-12);
    }
    assert_eq!(pca.transform.kind(), TransformKind::Pca);
    let one = fit_layer(
        &layers[0].weights,
        Some(&cal),
        &opts(TransformKind::Pca, MuPolicy::One),
        0,
    )
    .unwrap();
    let kl = fit_layer(
        &layers[0].weights,
        Some(&cal),
        &opts(TransformKind::Pca, MuPolicy::Kl),
        0,
    )
    .unwrap();
    assert_eq!(one.mus, vec![1.0; 4]);
    assert!(kl.mus.iter().any(|&m| m != 1.0), "{:?}", kl.mus);
    assert_eq!(kl.transform, one.transform);
    // Without a window the kl policy is refused; without latents so are PCA and variance.
    let no_window = LayerCalibration {
        moment: cal.moment.clone(),
        window: None,
    };
    let e = fit_layer(
        &layers[0].weights,
        Some(&no_window),
        &opts(TransformKind::Pca, MuPolicy::Kl),
        0,
    )
    .unwrap_err();
    assert!(e.message().contains("window"), "{e}");
    let empty = LayerCalibration {
        moment: SecondMoment::new(d.d_c),
        window: cal.window.clone(),
    };
    let e = fit_layer(
        &layers[0].weights,
        Some(&empty),
        &opts(TransformKind::Pca, MuPolicy::Kl),
        0,
    )
    .unwrap_err();
    assert!(
        e.message()
            .contains("PCA transform needs calibration latents"),
        "{e}"
    );
    // Hadamard with kl uses the window for mu and the latents for the fractions.
    let h = fit_layer(
        &layers[0].weights,
        Some(&cal),
        &opts(TransformKind::Hadamard, MuPolicy::Kl),
        0,
    )
    .unwrap();
    assert!((h.fractions.iter().sum::<f64>() - 1.0).abs() < 1e-12);
}

#[test]
fn writer_refuses_bad_records() {
    let d = dims();
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("cal.bin");
    let mut w = CalibrationWriter::create(&path, CalibrationShape::new(&d, 2).unwrap()).unwrap();
    let row = vec![0.5f32; d.d_c];
    assert_eq!(
        w.latents(2, &row).unwrap_err().kind(),
        ErrorKind::OutOfRange
    );
    assert!(w.latents(0, &row[1..]).is_err());
    assert!(w.latents(0, &[]).is_err());
    let mut nan = row.clone();
    nan[3] = f32::NAN;
    assert!(w.latents(0, &nan).unwrap_err().message().contains("finite"));
    let q = vec![0.1f32; d.heads * d.d_n];
    let qr = vec![0.1f32; d.heads * d.d_r];
    let kr = vec![0.1f32; d.d_r];
    assert!(w.window(0, &row, &kr, &q, &qr).is_ok());
    assert!(w.window(0, &row, &kr[1..], &q, &qr).is_err());
    assert!(w.window(0, &row, &kr, &[], &[]).is_err());
    assert!(w.window(0, &row, &kr, &q, &qr[1..]).is_err());
    drop(w);
    // An unfinished writer leaves nothing behind.
    assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 0);
    assert!(CalibrationShape::new(&d, 0).is_err());
}

#[test]
fn corrupted_calibration_files_are_errors() {
    let d = ModelDims::new(2, 16, 4, 8, 8, 0.3).unwrap();
    let layers = synthetic_layers(&d, 2, 27).unwrap();
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("cal.bin");
    let spec = SyntheticCalibration {
        tokens: 20,
        window: 6,
        queries: 2,
        seed: 5,
    };
    write_synthetic(&path, &layers, &spec).unwrap();
    let image = std::fs::read(&path).unwrap();
    let bad_path = dir.path().join("bad.bin");
    // Reads every part of the file: index, both layers' moments and windows.
    let read_all = |p: &std::path::Path| -> tpla::Result<()> {
        let f = CalibrationFile::open(p)?;
        for l in 0..2 {
            f.moment(l)?;
            f.window(l, 0)?;
        }
        Ok(())
    };
    read_all(&path).unwrap();
    // Every header byte, then every 7th byte (this file system makes a full sweep slow):
    // record headers, payloads and the end record all get hit.
    let positions = (0..64)
        .chain((64..image.len()).step_by(7))
        .chain([image.len() - 1]);
    for pos in positions {
        let mut bad = image.clone();
        bad[pos] ^= 0x10;
        std::fs::write(&bad_path, &bad).unwrap();
        let e = read_all(&bad_path);
        assert!(e.is_err(), "flipping byte {pos} was not noticed");
        let kind = e.unwrap_err().kind();
        let want = if (8..12).contains(&pos) {
            ErrorKind::Unsupported
        } else {
            ErrorKind::CorruptFile
        };
        assert_eq!(kind, want, "byte {pos}");
    }
    for cut in (0..image.len()).step_by(5) {
        std::fs::write(&bad_path, &image[..cut]).unwrap();
        assert!(CalibrationFile::open(&bad_path).is_err(), "cut at {cut}");
    }
    let mut longer = image.clone();
    longer.push(0);
    std::fs::write(&bad_path, &longer).unwrap();
    assert!(CalibrationFile::open(&bad_path)
        .unwrap_err()
        .message()
        .contains("follow the end record"));
    let mut v2 = image.clone();
    v2[8] = 2;
    std::fs::write(&bad_path, &v2).unwrap();
    assert_eq!(
        CalibrationFile::open(&bad_path).unwrap_err().kind(),
        ErrorKind::Unsupported
    );
}

#[test]
fn too_few_calibration_latents_say_how_many_are_needed() {
    // d_c = 64 in g = 2 contiguous PCA slices: slice 1 holds components 32..64, which 32
    // latents leave empty (their eigenvalues come out as round-off around zero)
    let d = dims();
    let layer = &synthetic_layers(&d, 1, 3).unwrap()[0];
    let opts = |layout| FitOptions {
        transform: TransformKind::Pca,
        layout,
        groups: 2,
        policy: MuPolicy::One,
        hadamard_seed: 1,
    };
    let latents = |tokens| layer.sequence(tokens, 9).tokens.latents;
    let few = LayerCalibration::from_latents(d.d_c, &latents(32), None).unwrap();
    let e = fit_layer(
        &layer.weights,
        Some(&few),
        &opts(SliceLayout::Contiguous),
        0,
    )
    .unwrap_err();
    assert_eq!(e.kind(), ErrorKind::InvalidArgument);
    assert!(
        e.message().contains("slice 1 of 2 gets none of the energy")
            && e.message().contains("32 calibration latents")
            && e.message()
                .contains("more than (g - 1) d_c / g = 32 latents"),
        "{e}"
    );
    // interleaved slices share the components, and one more latent is enough for both
    fit_layer(
        &layer.weights,
        Some(&few),
        &opts(SliceLayout::Interleaved),
        0,
    )
    .unwrap();
    let enough = LayerCalibration::from_latents(d.d_c, &latents(33), None).unwrap();
    fit_layer(
        &layer.weights,
        Some(&enough),
        &opts(SliceLayout::Contiguous),
        0,
    )
    .unwrap();
}
