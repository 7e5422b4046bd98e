//! Checks about the machine a Switchyard binary runs on, shared by the router and the worker.

/// The CPU must have what the build's baseline (x86-64-v3, `.cargo/config.toml`) assumes:
/// say so plainly and exit instead of dying on an illegal instruction later.
pub fn require_cpu_baseline() {
    #[cfg(target_arch = "x86_64")]
    if !(std::arch::is_x86_feature_detected!("avx2")
        && std::arch::is_x86_feature_detected!("fma")
        && std::arch::is_x86_feature_detected!("bmi2"))
    {
        eprintln!(
            "this build needs an x86-64-v3 CPU (AVX2, FMA, BMI2); rebuild with RUSTFLAGS=\"-C target-cpu=x86-64-v2\" for an older one"
        );
        std::process::exit(1);
    }
}
