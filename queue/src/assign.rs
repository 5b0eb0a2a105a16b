//! Engine-rank assignment: for every stage, a live worker that serves the model and task, least
//! outstanding work first (ties to the lowest rank); a client pin must name such a worker. With no
//! live worker for a stage the rank stays open and the first worker of that stage to ask takes it.
//! A preferred DiT rank (the one that ran the job's LoRA adapters last: they are in its memory)
//! wins while its load is within [`AFFINITY_SLACK`] of the least loaded rank.

use std::collections::HashMap;

use crate::error::QueueError;
use crate::queue::{Queue, WorkerInfo};
use crate::spec::{Ranks, Stage, Task};

/// Outstanding jobs a preferred DiT rank may have beyond the least loaded one and still be chosen.
pub const AFFINITY_SLACK: u64 = 1;

/// Picks a rank per stage from `workers` and their `loads` (rank -> outstanding jobs, per stage).
pub fn choose(
    workers: &[WorkerInfo],
    loads: &HashMap<Stage, HashMap<u32, u64>>,
    model: &str,
    task: Task,
    pins: Ranks,
) -> Result<Ranks, QueueError> {
    choose_with(workers, loads, model, task, pins, None)
}

/// [`choose`], preferring DiT rank `prefer_dit` (if it is a candidate) while its load is at most
/// [`AFFINITY_SLACK`] above the least loaded candidate's.
pub fn choose_with(
    workers: &[WorkerInfo],
    loads: &HashMap<Stage, HashMap<u32, u64>>,
    model: &str,
    task: Task,
    pins: Ranks,
    prefer_dit: Option<u32>,
) -> Result<Ranks, QueueError> {
    let mut ranks = Ranks::default();
    for stage in Stage::ALL {
        let candidates: Vec<u32> = workers
            .iter()
            .filter(|w| {
                w.stage == stage && w.models.iter().any(|m| m == model) && w.tasks.contains(&task)
            })
            .map(|w| w.rank)
            .collect();
        let chosen = match pins.get(stage) {
            Some(pin) if candidates.contains(&pin) => Some(pin),
            Some(pin) => {
                return Err(QueueError::Invalid(format!(
                    "{stage}_engine_rank {pin} is not a live {stage} worker serving `{model}` ({}); live {stage} ranks: {candidates:?}",
                    task.as_str()
                )));
            }
            None => {
                let load = |r: &u32| loads.get(&stage).and_then(|l| l.get(r)).copied().unwrap_or(0);
                let least = candidates.iter().copied().min_by_key(|r| (load(r), *r));
                match (stage, prefer_dit, least) {
                    (Stage::Dit, Some(p), Some(l))
                        if candidates.contains(&p) && load(&p) <= load(&l) + AFFINITY_SLACK =>
                    {
                        Some(p)
                    }
                    _ => least,
                }
            }
        };
        ranks.set(stage, chosen);
    }
    Ok(ranks)
}

/// Reads live workers and loads from `queue`, then [`choose`]s.
pub async fn assign(
    queue: &dyn Queue,
    model: &str,
    task: Task,
    pins: Ranks,
) -> Result<Ranks, QueueError> {
    let workers = queue.workers().await?;
    let loads = if workers.is_empty() { HashMap::new() } else { queue.loads(&Stage::ALL).await? };
    choose(&workers, &loads, model, task, pins)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn w(stage: Stage, rank: u32) -> WorkerInfo {
        WorkerInfo {
            stage,
            rank,
            models: vec!["m".into()],
            tasks: vec![Task::T2v],
            capacity: 1,
            unfit_loras: Default::default(),
        }
    }

    #[test]
    fn least_loaded_then_lowest_rank() {
        let workers = [w(Stage::Encoder, 0), w(Stage::Dit, 0), w(Stage::Dit, 1), w(Stage::Dit, 2)];
        let loads = HashMap::from([(Stage::Dit, HashMap::from([(0, 3), (1, 1), (2, 1)]))]);
        let r = choose(&workers, &loads, "m", Task::T2v, Ranks::default()).unwrap();
        assert_eq!(r, Ranks { encoder: Some(0), dit: Some(1), decoder: None });
    }

    #[test]
    fn a_preferred_dit_rank_wins_within_the_slack() {
        let workers = [w(Stage::Dit, 0), w(Stage::Dit, 1), w(Stage::Encoder, 0)];
        let at =
            |l0: u64, l1: u64| HashMap::from([(Stage::Dit, HashMap::from([(0, l0), (1, l1)]))]);
        let pick = |loads, prefer| {
            choose_with(&workers, &loads, "m", Task::T2v, Ranks::default(), prefer).unwrap().dit
        };
        assert_eq!(pick(at(0, 0), None), Some(0));
        assert_eq!(pick(at(0, 0), Some(1)), Some(1), "equal load: the preferred rank");
        assert_eq!(pick(at(0, 1), Some(1)), Some(1), "one job more: still the preferred rank");
        assert_eq!(pick(at(0, 2), Some(1)), Some(0), "beyond the slack: the least loaded");
        assert_eq!(pick(at(0, 0), Some(5)), Some(0), "a rank that is gone is not preferred");
        // Only the DiT stage follows the preference; pins still win.
        let pins = Ranks { dit: Some(0), ..Ranks::default() };
        let r = choose_with(&workers, &at(0, 0), "m", Task::T2v, pins, Some(1)).unwrap();
        assert_eq!((r.dit, r.encoder), (Some(0), Some(0)));
    }

    #[test]
    fn pins_are_honoured_or_refused_with_live_ranks() {
        let workers = [w(Stage::Dit, 0), w(Stage::Dit, 4)];
        let pins = Ranks { dit: Some(4), ..Ranks::default() };
        assert_eq!(choose(&workers, &HashMap::new(), "m", Task::T2v, pins).unwrap().dit, Some(4));
        let bad = Ranks { dit: Some(7), ..Ranks::default() };
        let err = choose(&workers, &HashMap::new(), "m", Task::T2v, bad).unwrap_err().to_string();
        assert!(err.contains("dit_engine_rank 7") && err.contains("[0, 4]"), "{err}");
    }

    #[test]
    fn workers_of_other_models_or_tasks_are_skipped() {
        let workers = [w(Stage::Dit, 0)];
        assert_eq!(
            choose(&workers, &HashMap::new(), "other", Task::T2v, Ranks::default()).unwrap().dit,
            None
        );
        assert_eq!(
            choose(&workers, &HashMap::new(), "m", Task::T2i, Ranks::default()).unwrap().dit,
            None
        );
    }
}
