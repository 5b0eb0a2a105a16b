//! x2v-proto: the gRPC services of x2v's stage services.
