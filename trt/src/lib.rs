//! x2v-trt: TensorRT engines for the VAE decoder (lazy per-resolution static engines and
//! multi-profile engines), falling back to the libtorch decoder when no engine fits.
//!
//! Not implemented yet: nothing here is usable today; the decoder uses libtorch only.
#![forbid(unsafe_code)]
