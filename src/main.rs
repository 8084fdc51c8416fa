//! The `carevault` binary: parse the CLI, set up logging, dispatch.
//! Exit codes: 0 success, 1 verification failed, 2 any other error.

#![forbid(unsafe_code)]

mod commands;

use clap::Parser;
use tracing_subscriber::EnvFilter;

use carevault::cli::{Cli, Command, LogFormat, TokenCommand};

/// mimalloc instead of glibc malloc: the request path allocates many small,
/// short-lived buffers across threads, where glibc's arena locking and
/// consolidation showed up at about a tenth of CPU time (BENCHMARKS.md).
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

/// Logs go to stderr through a writer thread that batches lines into few
/// `write` calls: a request logs one line, and writing it on the request
/// path cost about a tenth of read throughput (BENCHMARKS.md). The channel
/// is not lossy: when it is full, callers wait rather than drop lines. The
/// returned guard flushes what is queued when dropped.
///
/// Without `CAREVAULT_LOG`, every command logs at INFO but `bench`, whose
/// in-process server would log a line per measured request: it logs
/// warnings and errors only.
fn init_tracing(format: LogFormat, bench: bool) -> tracing_appender::non_blocking::WorkerGuard {
    let filter = EnvFilter::try_from_env("CAREVAULT_LOG").unwrap_or_else(|_| {
        EnvFilter::new(if bench {
            "warn"
        } else {
            "info,sled=warn,h2=warn,tower=warn,tonic::transport::server::io_stream=debug"
        })
    });
    let (writer, guard) = tracing_appender::non_blocking::NonBlockingBuilder::default()
        .lossy(false)
        .thread_name("carevault-log")
        .finish(std::io::BufWriter::new(std::io::stderr()));
    // Colour only on a terminal: a log file or collector gets plain text.
    let ansi = std::io::IsTerminal::is_terminal(&std::io::stderr());
    let builder = tracing_subscriber::fmt().with_env_filter(filter).with_ansi(ansi).with_writer(writer);
    match format {
        LogFormat::Text => builder.init(),
        LogFormat::Json => builder.json().init(),
    }
    guard
}

fn main() {
    let cli = Cli::parse();
    let log_guard = init_tracing(cli.log_format, matches!(cli.command, Command::Bench(_)));
    let runtime = match tokio::runtime::Builder::new_multi_thread().enable_all().build() {
        Ok(rt) => rt,
        Err(e) => {
            drop(log_guard);
            eprintln!("error: cannot start runtime: {e}");
            std::process::exit(2);
        }
    };
    let result = runtime.block_on(async move {
        match cli.command {
            Command::Serve(args) => commands::serve::serve(args).await.map(|()| 0),
            Command::Init(args) => commands::serve::init(args).await.map(|()| 0),
            Command::Verify(args) => commands::verify::verify(args).await,
            Command::Token(TokenCommand::Issue(args)) => commands::token::issue(args).map(|()| 0),
            Command::Certs(cmd) => commands::certs::run(cmd).map(|()| 0),
            Command::Keys(args) => commands::keys::run(args).await.map(|()| 0),
            Command::Client(args) => commands::client::run(args).await.map(|()| 0),
            Command::Backup(args) => commands::backup::run(args).map(|()| 0),
            Command::Bench(args) => commands::bench::run(args).await.map(|()| 0),
            Command::Audit(args) => commands::proof::audit(args).await,
            Command::VerifyProof(args) => commands::proof::verify_proof(args),
            Command::Witness(cmd) => commands::witness::run(cmd).await,
        }
    });
    // Queued log lines go out before the error line and before exit (which
    // runs no destructors).
    drop(log_guard);
    let code = match result {
        Ok(code) => code,
        Err(e) => {
            eprintln!("error: {}", causes(&e));
            2
        }
    };
    std::process::exit(code);
}

/// The error and its causes, each said once: a cause whose text its
/// wrapper already printed (several libraries include their source in their
/// own message) is left out.
fn causes(e: &anyhow::Error) -> String {
    let mut out: Vec<String> = Vec::new();
    for cause in e.chain() {
        let text = cause.to_string();
        if text.is_empty() || out.iter().any(|said| said.contains(&text)) {
            continue;
        }
        out.push(text);
    }
    out.join(": ")
}
