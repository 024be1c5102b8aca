//! `cpulocal`: info, bench.
fn main() {
    println!("{}", cpulocal::mechanism());
}
