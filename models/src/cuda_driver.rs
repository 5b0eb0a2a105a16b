//! The NVIDIA driver's own view of the GPUs, read through `libcuda.so.1` (CUDA driver API).
//!
//! libtorch can only report devices when its CUDA library is loaded; asking the driver directly tells
//! "no GPU here" apart from "GPUs present but libtorch cannot use them" (for example when
//! `libtorch_cuda.so` was dropped at link time).

use libloading::{Library, Symbol};
use std::ffi::{CStr, c_char, c_int};

/// One GPU as the driver describes it.
#[derive(Debug, Clone, PartialEq)]
pub struct DriverDevice {
    pub index: i32,
    pub name: String,
    /// Compute capability (major, minor), e.g. (9, 0) for Hopper.
    pub capability: (i32, i32),
    pub total_memory_bytes: u64,
}

/// What the driver reports.
#[derive(Debug, Clone, PartialEq)]
pub struct DriverInfo {
    /// CUDA driver API version, e.g. 13000 for 13.0.
    pub driver_version: i32,
    pub devices: Vec<DriverDevice>,
}

/// Why the driver could not be queried.
#[derive(Debug, thiserror::Error)]
pub enum DriverError {
    #[error("libcuda.so.1 not found (no NVIDIA driver on this host): {0}")]
    NotInstalled(String),
    #[error("CUDA driver call {call} failed with code {code}")]
    Call { call: &'static str, code: i32 },
}

const CU_DEVICE_ATTRIBUTE_COMPUTE_CAPABILITY_MAJOR: c_int = 75;
const CU_DEVICE_ATTRIBUTE_COMPUTE_CAPABILITY_MINOR: c_int = 76;

type CuInit = unsafe extern "C" fn(u32) -> c_int;
type CuDriverGetVersion = unsafe extern "C" fn(*mut c_int) -> c_int;
type CuDeviceGetCount = unsafe extern "C" fn(*mut c_int) -> c_int;
type CuDeviceGet = unsafe extern "C" fn(*mut c_int, c_int) -> c_int;
type CuDeviceGetName = unsafe extern "C" fn(*mut c_char, c_int, c_int) -> c_int;
type CuDeviceGetAttribute = unsafe extern "C" fn(*mut c_int, c_int, c_int) -> c_int;
type CuDeviceTotalMem = unsafe extern "C" fn(*mut usize, c_int) -> c_int;

fn check(call: &'static str, code: c_int) -> Result<(), DriverError> {
    if code == 0 { Ok(()) } else { Err(DriverError::Call { call, code }) }
}

/// Queries the driver. `Err(NotInstalled)` on hosts without an NVIDIA driver.
pub fn query() -> Result<DriverInfo, DriverError> {
    // SAFETY: loading the system CUDA driver library runs its initialisers, which have no
    // preconditions; the library stays loaded for the calls below.
    let lib = unsafe { Library::new("libcuda.so.1") }
        .map_err(|e| DriverError::NotInstalled(e.to_string()))?;
    // SAFETY: every symbol is looked up with the signature the CUDA driver API documents for it, and
    // each call gets valid out-pointers to locals of the documented types.
    unsafe {
        let sym = |name: &'static [u8]| -> Result<*const (), DriverError> {
            let s: Symbol<*const ()> = lib.get(name).map_err(|e| {
                DriverError::NotInstalled(format!("{}: {e}", String::from_utf8_lossy(name)))
            })?;
            Ok(*s)
        };
        let cu_init: CuInit = std::mem::transmute(sym(b"cuInit\0")?);
        let get_version: CuDriverGetVersion = std::mem::transmute(sym(b"cuDriverGetVersion\0")?);
        let get_count: CuDeviceGetCount = std::mem::transmute(sym(b"cuDeviceGetCount\0")?);
        let device_get: CuDeviceGet = std::mem::transmute(sym(b"cuDeviceGet\0")?);
        let get_name: CuDeviceGetName = std::mem::transmute(sym(b"cuDeviceGetName\0")?);
        let get_attr: CuDeviceGetAttribute = std::mem::transmute(sym(b"cuDeviceGetAttribute\0")?);
        let total_mem: CuDeviceTotalMem = std::mem::transmute(sym(b"cuDeviceTotalMem_v2\0")?);

        let mut driver_version = 0;
        check("cuDriverGetVersion", get_version(&mut driver_version))?;
        check("cuInit", cu_init(0))?;
        let mut count = 0;
        check("cuDeviceGetCount", get_count(&mut count))?;
        let mut devices = Vec::with_capacity(count.max(0) as usize);
        for index in 0..count {
            let mut dev = 0;
            check("cuDeviceGet", device_get(&mut dev, index))?;
            let mut name = [0 as c_char; 256];
            check("cuDeviceGetName", get_name(name.as_mut_ptr(), name.len() as c_int, dev))?;
            let (mut major, mut minor) = (0, 0);
            check(
                "cuDeviceGetAttribute",
                get_attr(&mut major, CU_DEVICE_ATTRIBUTE_COMPUTE_CAPABILITY_MAJOR, dev),
            )?;
            check(
                "cuDeviceGetAttribute",
                get_attr(&mut minor, CU_DEVICE_ATTRIBUTE_COMPUTE_CAPABILITY_MINOR, dev),
            )?;
            let mut bytes = 0usize;
            check("cuDeviceTotalMem_v2", total_mem(&mut bytes, dev))?;
            devices.push(DriverDevice {
                index,
                name: CStr::from_ptr(name.as_ptr()).to_string_lossy().into_owned(),
                capability: (major, minor),
                total_memory_bytes: bytes as u64,
            });
        }
        Ok(DriverInfo { driver_version, devices })
    }
}
