//! `zfs` for the scale benchmark's fake machines (see `ployz_e2e::fakezfs`): the machine's
//! state lives in `$PLOYZ_FAKEZFS_DIR`. Exits 1 with zfs's message on stderr, as `zfs` does.

use std::process::ExitCode;

fn main() -> ExitCode {
    let Some(dir) = std::env::var_os("PLOYZ_FAKEZFS_DIR") else {
        eprintln!("PLOYZ_FAKEZFS_DIR is not set: the fake zfs has no machine");
        return ExitCode::from(2);
    };
    let args: Vec<String> = std::env::args().skip(1).collect();
    let result = ployz_e2e::fakezfs::run(
        std::path::Path::new(&dir),
        &args,
        &mut std::io::stdin().lock(),
        &mut std::io::stdout().lock(),
    );
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("{e:#}");
            ExitCode::FAILURE
        }
    }
}
