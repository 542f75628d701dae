//! What the benchmark programs' `main`s share: one error type, parsers of counts for
//! their options, and running their async part to an exit code.

use std::future::Future;

pub type Error = Box<dyn std::error::Error + Send + Sync>;
pub type Result<T, E = Error> = std::result::Result<T, E>;

/// Runs `work` on `runtime` and returns what it returns; when it fails, prints
/// `<name>: <error>` and exits with code 1.
pub fn run<T>(
    name: &str,
    runtime: std::io::Result<tokio::runtime::Runtime>,
    work: impl Future<Output = Result<T>>,
) -> T {
    let runtime = or_exit(name, runtime.map_err(Error::from));
    or_exit(name, runtime.block_on(work))
}

/// What `result` holds; when it is an error, prints `<name>: <error>` and exits with
/// code 1.
pub fn or_exit<T>(name: &str, result: Result<T>) -> T {
    result.unwrap_or_else(|e| {
        eprintln!("{name}: {e}");
        std::process::exit(1)
    })
}

/// A count given on a command line; `_` may group digits (`10_000`).
pub fn count(v: &str) -> Result<u64, String> {
    v.replace('_', "").parse().map_err(|e| format!("{e}"))
}

/// A [`count`] of at least one (0 counts as 1).
pub fn at_least_one(v: &str) -> Result<u64, String> {
    Ok(count(v)?.max(1))
}

/// A runtime of two worker threads, for a benchmark that times the service's own
/// multi-threaded paths.
pub fn two_threads() -> std::io::Result<tokio::runtime::Runtime> {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
}

/// Without `--bench` (`cargo test --benches`) a benchmark only runs its `check` and says
/// `how` the measurement runs: true then, and the caller returns.
pub fn self_check_only(bench: bool, name: &str, how: &str, check: impl FnOnce()) -> bool {
    if !bench {
        check();
        println!("{name}: self-check passed; {how}.");
    }
    !bench
}
