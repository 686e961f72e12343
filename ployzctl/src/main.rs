//! ployzctl: the ployz command line.

fn main() -> std::process::ExitCode {
    ployzctl::main("ployzctl")
}
