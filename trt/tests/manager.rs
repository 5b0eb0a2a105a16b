//! The engine manager's policy on a fake loader: lazy loads, the LRU under a budget, engines in
//! use kept, one load per cold engine, remembered failures, and the fallback reason of each miss.

use std::collections::HashMap;
use std::path::Path;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::mpsc;
use std::sync::{Arc, Mutex};
use std::thread;

use x2v_trt::catalog::EngineSpec;
use x2v_trt::manager::{EngineManager, Loader};
use x2v_trt::{Catalog, Fallback, Miss, Size};

const MIB: u64 = 1 << 20;

/// A file whose load reports that it started, then waits to be released.
type Gate = (String, mpsc::Sender<()>, mpsc::Receiver<()>);

/// Engines named by file; how each load goes is scripted per file.
#[derive(Default)]
struct Fake {
    loads: Mutex<HashMap<String, usize>>,
    fail: Mutex<HashMap<String, Fallback>>,
    panic: Mutex<Vec<String>>,
    /// A load of this file waits for a message (and says it started).
    gate: Mutex<Option<Gate>>,
    total: AtomicUsize,
}

impl Fake {
    fn loads(&self, file: &str) -> usize {
        self.loads.lock().unwrap().get(file).copied().unwrap_or(0)
    }
}

/// The manager owns its loader; the test keeps a handle on the same script.
struct Scripted(Arc<Fake>);

impl Loader for Scripted {
    type Engine = String;

    fn load(&self, spec: &EngineSpec) -> Result<String, Miss> {
        let fake = &self.0;
        let name = spec.name();
        *fake.loads.lock().unwrap().entry(name.clone()).or_default() += 1;
        fake.total.fetch_add(1, Ordering::SeqCst);
        let gate = fake.gate.lock().unwrap().take();
        if let Some((file, started, release)) = gate {
            if file == name {
                started.send(()).unwrap();
                release.recv().unwrap();
            } else {
                *fake.gate.lock().unwrap() = Some((file, started, release));
            }
        }
        if fake.panic.lock().unwrap().contains(&name) {
            panic!("loader bug");
        }
        match fake.fail.lock().unwrap().get(&name) {
            Some(&reason) => Err(Miss::new(reason, format!("{name} is broken"))),
            None => Ok(name),
        }
    }
}

/// Static engines `e{size}.onnx` of 100 MiB each at 16×16, 32×32, …, plus a profile engine.
fn catalog() -> Catalog {
    let mut text = String::new();
    for side in [16, 32, 48, 64] {
        text += &format!(
            "[[static]]\nfile = \"e{side}.onnx\"\nheight = {side}\nwidth = {side}\nmemory_mib = 100\n"
        );
    }
    text += "[[profile]]\nfile = \"dyn.onnx\"\nmin = \"16x16\"\nmax = \"256x128\"\nopt = [\"128x128\"]\nmemory_mib = 150\n";
    Catalog::parse(&text, Path::new("engines.toml"), Path::new("/nowhere")).unwrap()
}

fn manager(budget_mib: u64) -> (Arc<EngineManager<Scripted>>, Arc<Fake>) {
    let fake = Arc::new(Fake::default());
    (Arc::new(EngineManager::new(catalog(), Scripted(fake.clone()), budget_mib * MIB)), fake)
}

fn sq(side: u32) -> Size {
    Size::new(side, side)
}

#[test]
fn engines_load_on_their_first_request_and_are_reused() {
    let (m, fake) = manager(1000);
    assert_eq!(fake.total.load(Ordering::SeqCst), 0, "nothing loads before a request");
    assert_eq!(*m.acquire(sq(16)).unwrap().engine(), "e16.onnx");
    assert_eq!(*m.acquire(sq(16)).unwrap().engine(), "e16.onnx");
    // A size with no static engine goes to the profile engine.
    assert_eq!(*m.acquire(Size::new(96, 80)).unwrap().engine(), "dyn.onnx");
    assert_eq!(fake.loads("e16.onnx"), 1);
    assert_eq!(fake.loads("dyn.onnx"), 1);
    assert_eq!(m.stats().loads, 2);
    assert_eq!(m.resident_bytes(), 250 * MIB);
}

#[test]
fn the_least_recently_used_idle_engine_makes_room() {
    let (m, fake) = manager(250);
    for side in [16, 32, 16] {
        m.acquire(sq(side)).unwrap();
    }
    // 16 was used after 32, so 32 goes.
    m.acquire(sq(48)).unwrap();
    assert_eq!(m.resident(), ["e16.onnx", "e48.onnx"]);
    assert_eq!(m.stats().evictions, 1);
    // The evicted engine loads again when asked for, evicting the now least recent (16).
    m.acquire(sq(32)).unwrap();
    assert_eq!(m.resident(), ["e48.onnx", "e32.onnx"]);
    assert_eq!(fake.loads("e32.onnx"), 2);
    assert!(m.resident_bytes() <= 250 * MIB);
}

#[test]
fn an_engine_in_use_is_never_unloaded_and_the_request_falls_back_instead() {
    let (m, _) = manager(200);
    let a = m.acquire(sq(16)).unwrap();
    let b = m.acquire(sq(32)).unwrap();
    let miss = m.acquire(sq(48)).err().unwrap();
    assert_eq!(miss.reason, Fallback::MemoryBudget);
    assert!(miss.message.contains("in use"), "{}", miss.message);
    assert_eq!(m.resident(), ["e16.onnx", "e32.onnx"]);
    // Once one is released, it can go (the budget miss was not remembered).
    drop(b);
    assert_eq!(*m.acquire(sq(48)).unwrap().engine(), "e48.onnx");
    assert_eq!(m.resident(), ["e16.onnx", "e48.onnx"]);
    drop(a);
}

#[test]
fn an_engine_larger_than_the_whole_budget_falls_back() {
    let (m, fake) = manager(120);
    let miss = m.acquire(sq(112)).err().unwrap();
    assert_eq!(miss.reason, Fallback::MemoryBudget);
    assert!(miss.message.contains("more than the whole budget"), "{}", miss.message);
    assert_eq!(fake.loads("dyn.onnx"), 0);
}

#[test]
fn two_requests_for_one_cold_engine_load_it_once() {
    let (m, fake) = manager(1000);
    let (started_tx, started) = mpsc::channel();
    let (release, release_rx) = mpsc::channel();
    *fake.gate.lock().unwrap() = Some(("e64.onnx".into(), started_tx, release_rx));
    let first = {
        let m = m.clone();
        thread::spawn(move || m.acquire(sq(64)).map(|l| l.engine().clone()))
    };
    started.recv().unwrap(); // the first request is inside the load
    let second = {
        let m = m.clone();
        thread::spawn(move || m.acquire(sq(64)).map(|l| l.engine().clone()))
    };
    // The second request waits for the first's load rather than starting its own.
    // (A second load would end the wait too, and fail the count below.)
    while m.waiting() == 0 && fake.loads("e64.onnx") < 2 {
        thread::yield_now();
    }
    release.send(()).unwrap();
    assert_eq!(first.join().unwrap().unwrap(), "e64.onnx");
    assert_eq!(second.join().unwrap().unwrap(), "e64.onnx");
    assert_eq!(fake.loads("e64.onnx"), 1);
}

#[test]
fn a_shape_no_engine_serves_falls_back() {
    let (m, fake) = manager(1000);
    for size in [Size::new(272, 128), Size::new(64, 144), sq(0)] {
        let miss = m.acquire(size).err().unwrap();
        assert_eq!(miss.reason, Fallback::NoEngineForShape, "{size}");
        assert!(miss.message.contains(&size.to_string()), "{}", miss.message);
    }
    assert_eq!(fake.total.load(Ordering::SeqCst), 0);
}

#[test]
fn a_failed_load_is_remembered_with_its_reason() {
    for reason in [
        Fallback::EngineMissing,
        Fallback::EngineLoadFailed,
        Fallback::EngineStale,
        Fallback::ProviderUnavailable,
    ] {
        let (m, fake) = manager(1000);
        fake.fail.lock().unwrap().insert("e32.onnx".into(), reason);
        for _ in 0..3 {
            let miss = m.acquire(sq(32)).err().unwrap();
            assert_eq!(miss.reason, reason);
            assert_eq!(miss.message, "e32.onnx is broken");
        }
        assert_eq!(fake.loads("e32.onnx"), 1, "{reason}: a failed engine is not retried");
        assert_eq!(m.stats().failed_loads, 1);
        // Other engines are unaffected, and the failed one holds no budget.
        assert!(m.acquire(sq(16)).is_ok());
        assert_eq!(m.resident_bytes(), 100 * MIB);
    }
}

#[test]
fn a_panicking_loader_is_a_failed_load_and_frees_its_waiters() {
    let (m, fake) = manager(1000);
    fake.panic.lock().unwrap().push("e48.onnx".into());
    let miss = m.acquire(sq(48)).err().unwrap();
    assert_eq!(miss.reason, Fallback::EngineLoadFailed);
    assert!(miss.message.contains("panicked"));
    // The slot left `Loading`: a second request does not hang.
    assert_eq!(m.acquire(sq(48)).err().unwrap().reason, Fallback::EngineLoadFailed);
}

#[test]
fn a_failed_run_unloads_the_engine_and_the_next_request_loads_it_afresh() {
    let (m, fake) = manager(1000);
    let lease = m.acquire(sq(16)).unwrap();
    let miss = m.run_failed(lease, "CUDA out of memory");
    assert_eq!(miss.reason, Fallback::RunFailed);
    assert!(m.resident().is_empty());
    m.acquire(sq(16)).unwrap();
    assert_eq!(fake.loads("e16.onnx"), 2);
}
