//! Scenario generators shared by the benchmarks in `src/bin/`.
