//! x2v-media: turns decoded frames (`uint8 [F, H, W, 3]` RGB) into what clients download.
#![forbid(unsafe_code)]
