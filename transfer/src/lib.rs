//! x2v-transfer: moves named tensors (Phase1 embeddings, Phase2 latents) between stage processes and
//! hosts over shared memory, TCP and (behind the `rdma` feature) RDMA verbs.
//!
//! Not implemented yet: this crate is filled by the transfer issue. Nothing here is usable today.
#![forbid(unsafe_code)]
