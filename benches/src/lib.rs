//! Criterion benchmarks of Gavel's hot paths live in `benches/`; see `docs/benchmarks.md` for
//! the commands and the numbers. This library is empty.
