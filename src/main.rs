//! The `portico` binary: parses the command line, sets up logging, and hands
//! over to the library.

fn main() -> std::process::ExitCode {
    let cli = match portico::config::parse() {
        Ok(cli) => cli,
        Err(e) => {
            eprintln!("error: {}", portico_agent::error_chain(&e));
            // clap's own exit code for a bad command line.
            return std::process::ExitCode::from(2);
        }
    };
    portico::logging::init(&cli.log);
    portico::raise_open_file_limit(&cli.command);
    let runtime = match runtime(cli.threads, shards_itself(&cli.command)) {
        Ok(rt) => rt,
        Err(e) => {
            tracing::error!(error = %portico_agent::error_chain(&e), "cannot start the async runtime");
            return std::process::ExitCode::FAILURE;
        }
    };
    match runtime.block_on(portico::run(cli)) {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            // Errors end on stderr as one readable line, whatever the log
            // format: the error and each of its sources once.
            eprintln!("error: {}", portico_agent::error_chain(e.as_ref()));
            // A load test that broke its thresholds ran fine: say so apart
            // from a run that failed, as k6 does.
            if e.downcast_ref::<portico_loadtest::ThresholdsFailed>()
                .is_some()
            {
                std::process::ExitCode::from(portico_loadtest::thresholds::THRESHOLDS_FAILED_EXIT)
            } else {
                std::process::ExitCode::FAILURE
            }
        }
    }
}

/// Whether the command starts threads of its own (a serving edge or
/// connector: its shards), each with a current-thread runtime, this one
/// included.
fn shards_itself(command: &portico::cli::Command) -> bool {
    use portico::cli::Command;
    match command {
        Command::Edge(c) => c.action.is_none(),
        Command::Connector(c) => c.action.is_none(),
        _ => false,
    }
}

/// One thread asked for, or a command that shards itself: a current-thread
/// runtime, where a request's tasks wake each other without crossing
/// threads. Otherwise the multi-thread runtime with the given number of
/// workers (default: one per core).
fn runtime(
    threads: Option<std::num::NonZeroUsize>,
    shards_itself: bool,
) -> std::io::Result<tokio::runtime::Runtime> {
    match threads.map(std::num::NonZeroUsize::get) {
        _ if shards_itself => tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build(),
        Some(1) => tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build(),
        Some(n) => tokio::runtime::Builder::new_multi_thread()
            .worker_threads(n)
            .enable_all()
            .build(),
        None => tokio::runtime::Runtime::new(),
    }
}
