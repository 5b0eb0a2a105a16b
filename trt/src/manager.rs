//! Engines loaded on demand under a memory budget.
//!
//! An engine loads the first time a request of a shape it serves arrives; later requests reuse
//! it. When loading one would exceed the budget, the least recently used engines that no request
//! holds are unloaded until it fits (LightX2V unloads every engine on any resolution miss). An
//! engine in use is never unloaded: if nothing else can go, the request falls back. Two requests
//! for the same cold shape load it once (the second waits for the first). A load that fails is
//! remembered: later requests for that engine fall back at once, without retrying a file that
//! is corrupt, missing or built for other weights.
//!
//! Every miss carries a [`Fallback`] reason; each (engine, reason) pair is logged once at `warn`,
//! repeats at `debug`. Counting them is the caller's job (it knows the backend that decoded).

use std::collections::HashSet;
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use crate::catalog::{Catalog, EngineSpec, Size};
use crate::fallback::Fallback;

/// Loads the engine of one catalog entry (ONNX Runtime sessions in production, fakes in tests).
pub trait Loader: Send + Sync + 'static {
    type Engine: Send + 'static;

    fn load(&self, spec: &EngineSpec) -> Result<Self::Engine, Miss>;
}

/// Why a request gets no engine, with the detail worth logging.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Miss {
    pub reason: Fallback,
    pub message: String,
}

impl Miss {
    pub fn new(reason: Fallback, message: impl Into<String>) -> Self {
        Miss { reason, message: message.into() }
    }
}

impl std::fmt::Display for Miss {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}: {}", self.reason.as_str(), self.message)
    }
}

/// A request's hold on a loaded engine; the engine is not unloaded while a lease exists.
pub struct Lease<E> {
    engine: Arc<Mutex<E>>,
    spec: EngineSpec,
}

impl<E> Lease<E> {
    /// Exclusive use of the engine (runs of one engine are serialised).
    pub fn engine(&self) -> MutexGuard<'_, E> {
        self.engine.lock().unwrap_or_else(|e| e.into_inner())
    }

    pub fn spec(&self) -> &EngineSpec {
        &self.spec
    }
}

/// Counters of the manager's own work (decodes are counted by the caller).
#[derive(Debug, Clone, Default, PartialEq)]
pub struct ManagerStats {
    pub loads: u64,
    pub failed_loads: u64,
    pub evictions: u64,
    /// Wall time of successful loads.
    pub load_time: Duration,
}

enum Slot<E> {
    Cold,
    Loading,
    Ready { engine: Arc<Mutex<E>>, last_used: u64 },
    Failed(Miss),
}

struct State<E> {
    slots: Vec<Slot<E>>,
    /// Bumped on every use; orders engines for eviction.
    clock: u64,
    /// Requests waiting for another request's load.
    waiting: usize,
    stats: ManagerStats,
}

/// The engines of one catalog, loaded lazily under `budget` bytes.
pub struct EngineManager<L: Loader> {
    catalog: Catalog,
    loader: L,
    budget: u64,
    state: Mutex<State<L::Engine>>,
    changed: Condvar,
    logged: Mutex<HashSet<(Option<usize>, Fallback)>>,
}

impl<L: Loader> EngineManager<L> {
    /// `budget` in bytes; `u64::MAX` for none.
    pub fn new(catalog: Catalog, loader: L, budget: u64) -> Self {
        let slots = catalog.engines.iter().map(|_| Slot::Cold).collect();
        EngineManager {
            catalog,
            loader,
            budget,
            state: Mutex::new(State {
                slots,
                clock: 0,
                waiting: 0,
                stats: ManagerStats::default(),
            }),
            changed: Condvar::new(),
            logged: Mutex::new(HashSet::new()),
        }
    }

    pub fn catalog(&self) -> &Catalog {
        &self.catalog
    }

    pub fn loader(&self) -> &L {
        &self.loader
    }

    pub fn budget(&self) -> u64 {
        self.budget
    }

    fn lock(&self) -> MutexGuard<'_, State<L::Engine>> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// The engine for an image of `size`, loading it (and unloading idle ones) if needed.
    pub fn acquire(&self, size: Size) -> Result<Lease<L::Engine>, Miss> {
        let Some(spec) = self.catalog.select(size) else {
            return Err(self.miss(
                None,
                Miss::new(
                    Fallback::NoEngineForShape,
                    format!("no engine in {} serves {size}", self.catalog.source.display()),
                ),
            ));
        };
        let id = spec.id;
        let mut st = self.lock();
        loop {
            st.clock += 1;
            let now = st.clock;
            match &mut st.slots[id] {
                Slot::Ready { engine, last_used } => {
                    *last_used = now;
                    return Ok(Lease { engine: engine.clone(), spec: spec.clone() });
                }
                Slot::Failed(miss) => {
                    let miss = miss.clone();
                    drop(st);
                    return Err(self.miss(Some(id), miss));
                }
                Slot::Loading => {
                    st.waiting += 1;
                    st = self.changed.wait(st).unwrap_or_else(|e| e.into_inner());
                    st.waiting -= 1;
                }
                Slot::Cold => {
                    if let Err(miss) = self.make_room(&mut st, spec) {
                        drop(st);
                        return Err(self.miss(Some(id), miss));
                    }
                    st.slots[id] = Slot::Loading;
                    drop(st);
                    st = self.load(spec);
                }
            }
        }
    }

    /// Loads `spec` outside the lock; the slot leaves `Loading` whatever happens (a panicking
    /// loader counts as a failed load), and waiters are woken.
    fn load(&self, spec: &EngineSpec) -> MutexGuard<'_, State<L::Engine>> {
        let started = Instant::now();
        let loaded =
            std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| self.loader.load(spec)))
                .unwrap_or_else(|_| {
                    Err(Miss::new(Fallback::EngineLoadFailed, "the loader panicked"))
                });
        let mut st = self.lock();
        st.slots[spec.id] = match loaded {
            Ok(engine) => {
                st.stats.loads += 1;
                st.stats.load_time += started.elapsed();
                tracing::info!(
                    engine = %spec.name(),
                    seconds = started.elapsed().as_secs_f64(),
                    charged_mib = spec.cost >> 20,
                    "VAE engine loaded"
                );
                Slot::Ready { engine: Arc::new(Mutex::new(engine)), last_used: st.clock }
            }
            Err(miss) => {
                st.stats.failed_loads += 1;
                Slot::Failed(miss)
            }
        };
        self.changed.notify_all();
        st
    }

    /// Unloads least recently used idle engines until `spec` fits the budget beside what is
    /// loaded or loading.
    fn make_room(&self, st: &mut State<L::Engine>, spec: &EngineSpec) -> Result<(), Miss> {
        if spec.cost > self.budget {
            return Err(Miss::new(
                Fallback::MemoryBudget,
                format!(
                    "the engine needs {} MiB, more than the whole budget of {} MiB",
                    spec.cost >> 20,
                    self.budget >> 20
                ),
            ));
        }
        loop {
            let used: u64 = self
                .catalog
                .engines
                .iter()
                .zip(&st.slots)
                .filter(|(_, s)| matches!(s, Slot::Ready { .. } | Slot::Loading))
                .map(|(e, _)| e.cost)
                .sum();
            if used.saturating_add(spec.cost) <= self.budget {
                return Ok(());
            }
            // An engine is idle when the slot holds the only reference (leases clone it under
            // this lock, so the count cannot rise behind our back).
            let victim = st
                .slots
                .iter()
                .enumerate()
                .filter_map(|(i, s)| match s {
                    Slot::Ready { engine, last_used } if Arc::strong_count(engine) == 1 => {
                        Some((*last_used, i))
                    }
                    _ => None,
                })
                .min();
            let Some((_, victim)) = victim else {
                return Err(Miss::new(
                    Fallback::MemoryBudget,
                    format!(
                        "{} MiB of {} MiB are held by engines in use; {} needs {} MiB",
                        used >> 20,
                        self.budget >> 20,
                        spec.name(),
                        spec.cost >> 20
                    ),
                ));
            };
            tracing::info!(
                evicted = %self.catalog.engines[victim].name(),
                for_engine = %spec.name(),
                "VAE engine unloaded (least recently used) to stay within the memory budget"
            );
            st.slots[victim] = Slot::Cold;
            st.stats.evictions += 1;
        }
    }

    /// A run of `lease`'s engine failed: the engine is unloaded (its state is suspect; the next
    /// request loads it afresh) and the miss is logged like any other.
    pub fn run_failed(&self, lease: Lease<L::Engine>, message: impl Into<String>) -> Miss {
        let id = lease.spec.id;
        let engine = lease.engine;
        {
            let mut st = self.lock();
            if let Slot::Ready { engine: held, .. } = &st.slots[id]
                && Arc::ptr_eq(held, &engine)
            {
                st.slots[id] = Slot::Cold;
            }
        }
        drop(engine);
        self.miss(Some(id), Miss::new(Fallback::RunFailed, message))
    }

    /// Logs `miss` once per (engine, reason) at `warn`, afterwards at `debug`.
    pub fn miss(&self, engine: Option<usize>, miss: Miss) -> Miss {
        let first =
            self.logged.lock().unwrap_or_else(|e| e.into_inner()).insert((engine, miss.reason));
        let name = engine.map(|i| self.catalog.engines[i].name()).unwrap_or_default();
        if first {
            tracing::warn!(reason = miss.reason.as_str(), engine = %name, "VAE decode falls back to libtorch: {}", miss.message);
        } else {
            tracing::debug!(reason = miss.reason.as_str(), engine = %name, "VAE decode falls back to libtorch: {}", miss.message);
        }
        miss
    }

    /// Names of the loaded engines, least recently used first.
    pub fn resident(&self) -> Vec<String> {
        let st = self.lock();
        let mut loaded: Vec<(u64, String)> = st
            .slots
            .iter()
            .zip(&self.catalog.engines)
            .filter_map(|(s, e)| match s {
                Slot::Ready { last_used, .. } => Some((*last_used, e.name())),
                _ => None,
            })
            .collect();
        loaded.sort();
        loaded.into_iter().map(|(_, n)| n).collect()
    }

    /// Bytes charged for the loaded engines.
    pub fn resident_bytes(&self) -> u64 {
        let st = self.lock();
        st.slots
            .iter()
            .zip(&self.catalog.engines)
            .filter(|(s, _)| matches!(s, Slot::Ready { .. }))
            .map(|(_, e)| e.cost)
            .sum()
    }

    /// Requests now waiting for an engine another request is loading.
    pub fn waiting(&self) -> usize {
        self.lock().waiting
    }

    pub fn stats(&self) -> ManagerStats {
        self.lock().stats.clone()
    }
}
