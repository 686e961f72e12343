//! `kubectl ployz ...`: ployzctl as a kubectl plugin (kubectl runs `kubectl-ployz` from PATH).

fn main() -> std::process::ExitCode {
    ployzctl::main("kubectl ployz")
}
