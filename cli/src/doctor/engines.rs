//! What `x2v doctor` says about the VAE engine path: the ONNX Runtime library, which of its
//! execution providers work here, and (given a catalog) whether each engine loads.

use std::path::Path;

use x2v_trt::Catalog;
use x2v_trt::engine::OrtLoader;
use x2v_trt::manager::Loader;
use x2v_trt::runtime::{OnnxRuntime, Provider};

use super::{Check, Status, check};

pub fn checks(catalog: Option<&Path>) -> Vec<Check> {
    let runtime = match OnnxRuntime::get(None) {
        Ok(r) => r,
        Err(e) => {
            // Without engines configured this is only worth knowing; with them, every decode
            // would fall back.
            let status = if catalog.is_some() { Status::Fail } else { Status::Warn };
            return vec![check("onnxruntime", status, format!("{e}; VAE decodes run on libtorch"))];
        }
    };
    let mut out = vec![check(
        "onnxruntime",
        Status::Ok,
        format!("{} from {}", runtime.version(), runtime.path.display()),
    )];
    for provider in [Provider::TensorRt, Provider::Cuda] {
        out.push(match runtime.probe(provider, 0) {
            Ok(()) => {
                check("provider", Status::Ok, format!("{} usable on cuda:0", provider.ep_name()))
            }
            Err(e) => check("provider", Status::Warn, e),
        });
    }
    out.push(check("provider", Status::Ok, "CPUExecutionProvider usable"));
    if let Some(path) = catalog {
        out.extend(engine_checks(runtime, path));
    }
    out
}

fn engine_checks(runtime: &'static OnnxRuntime, path: &Path) -> Vec<Check> {
    let catalog = match Catalog::from_file(path) {
        Ok(c) => c,
        Err(e) => return vec![check("engines", Status::Fail, e.to_string())],
    };
    let loader = OrtLoader::new(runtime, Provider::Cpu, 0, catalog.precision, "".into(), None);
    catalog
        .engines
        .iter()
        .map(|spec| {
            let serves = &spec.coverage;
            let size = std::fs::metadata(&spec.path).map_or(0, |m| m.len());
            match loader.load(spec) {
                Ok(_) => check(
                    "engine",
                    Status::Ok,
                    format!(
                        "{} ({serves}, {:.1} MiB, charged {} MiB) loads",
                        spec.name(),
                        size as f64 / (1u64 << 20) as f64,
                        spec.cost >> 20
                    ),
                ),
                Err(miss) => {
                    check("engine", Status::Fail, format!("{} ({serves}): {miss}", spec.name()))
                }
            }
        })
        .collect()
}
