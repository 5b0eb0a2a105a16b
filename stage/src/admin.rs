//! gRPC health and admin, HTTP metrics (being written).
