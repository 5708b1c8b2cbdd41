//! Wire protocol (gRPC) between the controller and its agents: arrives with the distribution issue.
