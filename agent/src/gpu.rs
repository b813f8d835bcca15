//! GPU telemetry through NVML (`nvml-wrapper`, which loads `libnvidia-ml` at run time): utilisation,
//! memory used and total, power and temperature of the GPUs the worker uses. Without the library or
//! without a GPU the agent logs one line and reports no GPU, never fails.
//!
//! Which GPUs: `--gpus 0,1`, else `CUDA_VISIBLE_DEVICES`, else every GPU NVML sees. Entries are NVML
//! indices or UUIDs (`GPU-...`, `MIG-...`). NVML numbers GPUs in PCI bus order; CUDA does too only
//! with `CUDA_DEVICE_ORDER=PCI_BUS_ID` (its default is fastest first), so UUIDs are the safe choice
//! on machines with mixed GPU models.

use std::ffi::OsStr;

use nvml_wrapper::Nvml;
use nvml_wrapper::enum_wrappers::device::TemperatureSensor;
use serde::Serialize;
use tracing::{info, warn};

/// One GPU as the worker is told to use it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum GpuRef {
    /// NVML index.
    Index(u32),
    /// GPU or MIG UUID.
    Uuid(String),
}

/// Reads the GPU list from `--gpus` or `CUDA_VISIBLE_DEVICES`; `None` means every GPU.
pub fn selection(flag: Option<&str>, cuda_visible_devices: Option<&str>) -> Option<Vec<GpuRef>> {
    let list = flag.or(cuda_visible_devices)?;
    let mut refs = Vec::new();
    for item in list.split(',').map(str::trim).filter(|s| !s.is_empty()) {
        match item.parse::<i64>() {
            // CUDA stops at the first invalid index (`-1` hides every GPU).
            Ok(n) => match u32::try_from(n) {
                Ok(n) => refs.push(GpuRef::Index(n)),
                Err(_) => break,
            },
            Err(_) if item.starts_with("GPU-") || item.starts_with("MIG-") => {
                refs.push(GpuRef::Uuid(item.to_owned()))
            }
            Err(_) => break,
        }
    }
    Some(refs)
}

/// One reading of one GPU; a field NVML could not read is absent.
#[derive(Clone, Debug, Default, PartialEq, Serialize)]
pub struct GpuReading {
    /// NVML index.
    pub index: u32,
    /// Product name.
    pub name: Option<String>,
    /// GPU UUID.
    pub uuid: Option<String>,
    /// Busy fraction over NVML's last sample period, 0 to 1.
    pub utilization: Option<f32>,
    /// Memory in use.
    pub memory_used_bytes: Option<u64>,
    /// Memory installed.
    pub memory_total_bytes: Option<u64>,
    /// Power draw.
    pub power_watts: Option<f32>,
    /// Core temperature.
    pub temperature_celsius: Option<u32>,
}

impl GpuReading {
    /// The wire form (absent fields read 0).
    pub fn to_proto(&self) -> kvmesh_proto::v1::GpuStats {
        kvmesh_proto::v1::GpuStats {
            index: self.index,
            utilization: self.utilization.unwrap_or(0.0),
            memory_used_bytes: self.memory_used_bytes.unwrap_or(0),
            memory_total_bytes: self.memory_total_bytes.unwrap_or(0),
            power_watts: self.power_watts.unwrap_or(0.0),
            temperature_celsius: self.temperature_celsius.map_or(0.0, |t| t as f32),
        }
    }
}

/// The GPUs of this worker, or none.
pub struct Gpus {
    nvml: Option<Nvml>,
    selection: Option<Vec<GpuRef>>,
    /// Why NVML is unavailable, for the probe's output.
    unavailable: Option<String>,
}

impl Gpus {
    /// Opens NVML (once). Logs one line saying what it found.
    pub fn open(selection: Option<Vec<GpuRef>>) -> Gpus {
        let nvml = Nvml::init().or_else(|first| {
            // Without the driver's development package only the versioned name exists.
            Nvml::builder().lib_path(OsStr::new("libnvidia-ml.so.1")).init().map_err(|_| first)
        });
        match nvml {
            Ok(nvml) => {
                let count = nvml.device_count().unwrap_or(0);
                let driver = nvml.sys_driver_version().unwrap_or_default();
                info!(gpus = count, driver = %driver, selection = ?selection, "NVML ready");
                Gpus { nvml: Some(nvml), selection, unavailable: None }
            }
            Err(e) => {
                info!(reason = %e, "no NVIDIA GPU telemetry (NVML unavailable): GPU fields stay absent");
                Gpus { nvml: None, selection, unavailable: Some(e.to_string()) }
            }
        }
    }

    /// No GPU telemetry at all (tests, or `--gpus none`).
    pub fn none() -> Gpus {
        Gpus { nvml: None, selection: Some(Vec::new()), unavailable: Some("disabled".to_owned()) }
    }

    /// Reads every selected GPU. A GPU that cannot be opened is skipped with a warning.
    pub fn read(&self) -> Vec<GpuReading> {
        let Some(nvml) = &self.nvml else {
            return Vec::new();
        };
        let refs = match &self.selection {
            Some(refs) => refs.clone(),
            None => (0..nvml.device_count().unwrap_or(0)).map(GpuRef::Index).collect(),
        };
        let mut out = Vec::with_capacity(refs.len());
        for gpu in refs {
            let device = match &gpu {
                GpuRef::Index(i) => nvml.device_by_index(*i),
                GpuRef::Uuid(uuid) => nvml.device_by_uuid(uuid.as_str()),
            };
            let device = match device {
                Ok(device) => device,
                Err(e) => {
                    warn!(gpu = ?gpu, error = %e, "cannot open GPU");
                    continue;
                }
            };
            let memory = device.memory_info().ok();
            out.push(GpuReading {
                index: device.index().unwrap_or(match gpu {
                    GpuRef::Index(i) => i,
                    GpuRef::Uuid(_) => u32::MAX,
                }),
                name: device.name().ok(),
                uuid: device.uuid().ok(),
                utilization: device.utilization_rates().ok().map(|u| u.gpu as f32 / 100.0),
                memory_used_bytes: memory.as_ref().map(|m| m.used),
                memory_total_bytes: memory.as_ref().map(|m| m.total),
                power_watts: device.power_usage().ok().map(|mw| mw as f32 / 1000.0),
                temperature_celsius: device.temperature(TemperatureSensor::Gpu).ok(),
            });
        }
        out
    }

    /// One JSON document: whether NVML loaded, the driver, and a reading of each selected GPU
    /// (what `kvmesh agent --gpu-probe` prints).
    pub fn probe_json(&self) -> String {
        let driver = self.nvml.as_ref().and_then(|n| n.sys_driver_version().ok());
        let count = self.nvml.as_ref().and_then(|n| n.device_count().ok());
        let doc = serde_json::json!({
            "nvml": self.unavailable.as_deref().map_or_else(|| "ok".to_owned(), |why| format!("unavailable: {why}")),
            "driver_version": driver,
            "device_count": count,
            "gpus": self.read(),
        });
        doc.to_string()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn selection_from_flag_or_cuda_visible_devices() {
        assert_eq!(selection(None, None), None);
        assert_eq!(selection(Some("0, 2"), Some("5")), Some(vec![GpuRef::Index(0), GpuRef::Index(2)]));
        assert_eq!(selection(None, Some("1")), Some(vec![GpuRef::Index(1)]));
        assert_eq!(selection(None, Some("")), Some(vec![]));
        assert_eq!(selection(None, Some("-1")), Some(vec![]));
        assert_eq!(selection(None, Some("0,-1,1")), Some(vec![GpuRef::Index(0)]));
        assert_eq!(
            selection(None, Some("GPU-8f0c,MIG-aa")),
            Some(vec![GpuRef::Uuid("GPU-8f0c".into()), GpuRef::Uuid("MIG-aa".into())])
        );
    }

    #[test]
    fn absent_fields_read_zero_on_the_wire() {
        let stats = GpuReading { index: 3, power_watts: Some(71.5), ..GpuReading::default() }.to_proto();
        assert_eq!((stats.index, stats.power_watts, stats.memory_total_bytes), (3, 71.5, 0));
    }

    #[test]
    fn disabled_gpus_read_nothing() {
        let gpus = Gpus::none();
        assert!(gpus.read().is_empty());
        assert!(gpus.probe_json().contains("\"nvml\":\"unavailable: disabled\""));
    }
}
