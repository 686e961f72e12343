//! Runs a suite: one environment, tests one after another against it, libtest-style output
//! (`test result: ok. N passed; ...`), and a teardown that always happens.

use std::process::ExitCode;
use std::sync::{Arc, Mutex};

use anyhow::Result;
use libtest_mimic::{Arguments, Failed, Trial};

use crate::env::{Env, Options};

/// A test of a suite.
pub type Test = fn(&mut Env) -> Result<()>;

/// Logs of the library code under test, on stderr: PLOYZ_LOG=ployz=info (default: errors
/// only, since the suites provoke refusals on purpose; not kube's per-request errors, which
/// the harness's polling of a starting API server would print by the dozen).
pub fn init_logging() {
    let filter = tracing_subscriber::EnvFilter::try_from_env("PLOYZ_LOG").unwrap_or_else(|_| {
        tracing_subscriber::EnvFilter::new("error,kube_client::client::builder=off")
    });
    let _ = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .with_writer(std::io::stderr)
        .try_init();
}

pub fn run(opts: Options, tests: &[(&'static str, Test)]) -> ExitCode {
    init_logging();
    let mut args = Arguments::from_args();
    // The tests share one environment, so they run one at a time, in order.
    args.test_threads = Some(1);
    let selected = tests
        .iter()
        .any(|(name, _)| args.filter.as_deref().is_none_or(|f| name.contains(f)));
    if args.list || !selected {
        let trials = tests
            .iter()
            .map(|(n, _)| Trial::test(*n, || Ok(())))
            .collect();
        return libtest_mimic::run(&args, trials).exit_code();
    }
    // Releases everything even when start-up panics half-way.
    let _teardown = Teardown;
    let env = match Env::start(opts) {
        Ok(env) => Arc::new(Mutex::new(env)),
        Err(e) => {
            eprintln!("error: the test environment did not start: {e:#}");
            // Make the failure visible to a runner that counts tests.
            println!("test result: FAILED. 0 passed; {} failed", tests.len());
            return ExitCode::FAILURE;
        }
    };
    let trials = tests
        .iter()
        .map(|&(name, test)| {
            let env = Arc::clone(&env);
            Trial::test(name, move || {
                let mut env = env.lock().unwrap_or_else(|p| p.into_inner());
                test(&mut env).map_err(|e| Failed::from(format!("{e:#}")))
            })
        })
        .collect();
    let conclusion = libtest_mimic::run(&args, trials);
    drop(env);
    conclusion.exit_code()
}

struct Teardown;

impl Drop for Teardown {
    fn drop(&mut self) {
        crate::reaper::release_all();
    }
}
