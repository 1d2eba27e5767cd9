use kshot::eval::mean_ci95;

#[test]
fn ci95_is_1_96_sample_std_over_sqrt_n() {
    let xs = [0.9, 1.0, 0.8, 1.0, 0.95];
    let (mean, ci) = mean_ci95(&xs);
    assert!((mean - 0.93).abs() < 1e-12);
    // sample variance: sum of squared deviations / (n - 1)
    let ss: f64 = xs.iter().map(|x| (x - 0.93f64).powi(2)).sum();
    let expect = 1.96 * (ss / 4.0).sqrt() / 5f64.sqrt();
    assert!((ci - expect).abs() < 1e-12, "{ci} vs {expect}");
    assert!(
        (ci - 0.073336).abs() < 1e-6,
        "hand-computed: 1.96 · 0.083666 / √5 = 0.073336, got {ci}"
    );
    assert_eq!(mean_ci95(&[1.0, 1.0, 1.0]), (1.0, 0.0));
    assert_eq!(mean_ci95(&[0.5]), (0.5, 0.0));
}
