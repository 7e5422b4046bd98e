//! GPU utilisation and memory from NVML (feature `nvml`, on with `cuda`), sampled when
//! `/metrics` is scraped:
//!
//! | metric | meaning |
//! | --- | --- |
//! | `switchyard_worker_gpu_utilization_ratio` | share of the last sample period a kernel ran (0–1) |
//! | `switchyard_worker_gpu_memory_used_bytes` | device memory in use (every process) |
//! | `switchyard_worker_gpu_memory_total_bytes` | device memory |
//!
//! NVML is loaded at run time (`libnvidia-ml`, shipped with the driver), so the build needs
//! no CUDA; where it cannot be loaded the worker says why once and exports no GPU series.

/// The GPU a worker runs on, when it runs on one and NVML answers.
#[cfg(feature = "nvml")]
pub struct Gpu {
    nvml: nvml_wrapper::Nvml,
    index: u32,
    registry: prometheus::Registry,
    utilization: prometheus::Gauge,
    used: prometheus::IntGauge,
    total: prometheus::IntGauge,
}

#[cfg(feature = "nvml")]
impl Gpu {
    /// The GPU of `device` (`cuda` or `cuda:N`); `None` for other devices or without NVML.
    pub fn open(device: &str) -> Option<Self> {
        let index = match device.strip_prefix("cuda") {
            Some("") => 0,
            Some(n) => n.strip_prefix(':')?.parse().ok()?,
            None => return None,
        };
        let nvml = match nvml_wrapper::Nvml::init() {
            Ok(n) => n,
            Err(e) => {
                tracing::warn!("NVML unavailable ({e}): no GPU utilisation or memory metrics");
                return None;
            }
        };
        let registry = prometheus::Registry::new();
        let utilization = prometheus::Gauge::new(
            "switchyard_worker_gpu_utilization_ratio",
            "Share of NVML's last sample period a kernel ran on the worker's GPU (0-1).",
        )
        .ok()?;
        let used = prometheus::IntGauge::new(
            "switchyard_worker_gpu_memory_used_bytes",
            "Device memory in use on the worker's GPU (every process).",
        )
        .ok()?;
        let total = prometheus::IntGauge::new(
            "switchyard_worker_gpu_memory_total_bytes",
            "Device memory of the worker's GPU.",
        )
        .ok()?;
        for g in [
            Box::new(utilization.clone()) as Box<dyn prometheus::core::Collector>,
            Box::new(used.clone()),
            Box::new(total.clone()),
        ] {
            registry.register(g).ok()?;
        }
        Some(Self {
            nvml,
            index,
            registry,
            utilization,
            used,
            total,
        })
    }

    /// Samples the GPU; its series in the text format (empty when NVML fails now).
    pub fn encode(&self) -> String {
        use prometheus::Encoder;
        let Ok(device) = self.nvml.device_by_index(self.index) else {
            return String::new();
        };
        if let Ok(u) = device.utilization_rates() {
            self.utilization.set(f64::from(u.gpu) / 100.0);
        }
        if let Ok(m) = device.memory_info() {
            self.used.set(i64::try_from(m.used).unwrap_or(i64::MAX));
            self.total.set(i64::try_from(m.total).unwrap_or(i64::MAX));
        }
        let mut out = Vec::new();
        let _ = prometheus::TextEncoder::new().encode(&self.registry.gather(), &mut out);
        String::from_utf8(out).unwrap_or_default()
    }
}

/// Without the `nvml` feature: no GPU series.
#[cfg(not(feature = "nvml"))]
pub struct Gpu;

#[cfg(not(feature = "nvml"))]
impl Gpu {
    pub fn open(_device: &str) -> Option<Self> {
        None
    }
    pub fn encode(&self) -> String {
        String::new()
    }
}

#[cfg(all(test, feature = "nvml"))]
mod tests {
    #[test]
    fn only_cuda_devices_have_a_gpu_and_a_machine_without_nvml_has_none() {
        assert!(super::Gpu::open("cpu").is_none());
        assert!(super::Gpu::open("cuda:x").is_none());
        // this machine has no NVIDIA driver: NVML does not load, and nothing is exported
        if std::path::Path::new("/proc/driver/nvidia").exists() {
            let g = super::Gpu::open("cuda:0").expect("NVML on a GPU machine");
            assert!(
                g.encode()
                    .contains("switchyard_worker_gpu_memory_total_bytes")
            );
        } else {
            assert!(super::Gpu::open("cuda:0").is_none());
        }
    }
}
