//! Benchmarks live under `benches/benches/`; this binary only points there.

fn main() {
    println!("run `cargo bench -p benches` for the benchmarks (see docs/benchmarks.md)");
}
