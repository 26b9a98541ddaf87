//! The `portico` binary: parses the command line, sets up logging, and hands
//! over to the library.

use clap::Parser;

fn main() -> std::process::ExitCode {
    let cli = portico::cli::Cli::parse();
    portico::logging::init(&cli.log);
    let runtime = match tokio::runtime::Runtime::new() {
        Ok(rt) => rt,
        Err(e) => {
            tracing::error!(error = %e, "cannot start the async runtime");
            return std::process::ExitCode::FAILURE;
        }
    };
    match runtime.block_on(portico::run(cli)) {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            // Errors end on stderr as one readable line, whatever the log format.
            eprintln!("error: {e:#}");
            std::process::ExitCode::FAILURE
        }
    }
}
