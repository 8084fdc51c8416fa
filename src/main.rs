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

fn init_tracing(format: LogFormat) {
    let filter = EnvFilter::try_from_env("CAREVAULT_LOG")
        .unwrap_or_else(|_| EnvFilter::new("info,sled=warn,h2=warn,tower=warn"));
    let builder = tracing_subscriber::fmt().with_env_filter(filter).with_writer(std::io::stderr);
    match format {
        LogFormat::Text => builder.init(),
        LogFormat::Json => builder.json().init(),
    }
}

fn main() {
    let cli = Cli::parse();
    init_tracing(cli.log_format);
    let runtime = match tokio::runtime::Builder::new_multi_thread().enable_all().build() {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("error: cannot start runtime: {e}");
            std::process::exit(2);
        }
    };
    let code = runtime.block_on(async move {
        let result = match cli.command {
            Command::Serve(args) => commands::serve::serve(args).await.map(|()| 0),
            Command::Init(args) => commands::serve::init(args).map(|()| 0),
            Command::Verify(args) => commands::verify::verify(args).await,
            Command::Token(TokenCommand::Issue(args)) => commands::token::issue(args).map(|()| 0),
            Command::Certs(cmd) => commands::certs::run(cmd).map(|()| 0),
            Command::Keys(args) => commands::keys::run(args).await.map(|()| 0),
            Command::Client(args) => commands::client::run(args).await.map(|()| 0),
            Command::Backup(args) => commands::backup::run(args).map(|()| 0),
            Command::Bench(args) => commands::bench::run(args).await.map(|()| 0),
        };
        match result {
            Ok(code) => code,
            Err(e) => {
                eprintln!("error: {e:#}");
                2
            }
        }
    });
    std::process::exit(code);
}
