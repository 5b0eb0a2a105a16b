//! Event-stream helpers shared by the backends.

use futures::StreamExt;
use futures::stream::{BoxStream, Stream};

use crate::record::JobEvent;

/// Passes events through up to and including the first terminal one, then ends (without waiting
/// for another event from the source).
pub fn until_terminal(
    events: impl Stream<Item = JobEvent> + Send + 'static,
) -> BoxStream<'static, JobEvent> {
    futures::stream::unfold((events.boxed(), false), |(mut source, done)| async move {
        if done {
            return None;
        }
        let ev = source.next().await?;
        let terminal = ev.status.is_terminal();
        Some((ev, (source, terminal)))
    })
    .boxed()
}
