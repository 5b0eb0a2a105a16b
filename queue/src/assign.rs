//! Engine-rank assignment: for every stage, a live worker that serves the model and task, least
//! outstanding work first (ties to the lowest rank); a client pin must name such a worker. With no
//! live worker for a stage the rank stays open and the first worker of that stage to ask takes it.

use std::collections::HashMap;

use crate::error::QueueError;
use crate::queue::{Queue, WorkerInfo};
use crate::spec::{Ranks, Stage, Task};

/// Picks a rank per stage from `workers` and their `loads` (rank -> outstanding jobs, per stage).
pub fn choose(
    workers: &[WorkerInfo],
    loads: &HashMap<Stage, HashMap<u32, u64>>,
    model: &str,
    task: Task,
    pins: Ranks,
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
                candidates.iter().copied().min_by_key(|r| (load(r), *r))
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
        WorkerInfo { stage, rank, models: vec!["m".into()], tasks: vec![Task::T2v], capacity: 1 }
    }

    #[test]
    fn least_loaded_then_lowest_rank() {
        let workers = [w(Stage::Encoder, 0), w(Stage::Dit, 0), w(Stage::Dit, 1), w(Stage::Dit, 2)];
        let loads = HashMap::from([(Stage::Dit, HashMap::from([(0, 3), (1, 1), (2, 1)]))]);
        let r = choose(&workers, &loads, "m", Task::T2v, Ranks::default()).unwrap();
        assert_eq!(r, Ranks { encoder: Some(0), dit: Some(1), decoder: None });
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
