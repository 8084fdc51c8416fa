//! `carevault certs dev`: a development CA and certificates.

use carevault::auth::tls::{DEV_CLIENT_IDENTITY, write_dev_certs};
use carevault::cli::CertsCommand;
use carevault::config::default_key_dir;

/// Runs a `certs` subcommand.
pub fn run(cmd: CertsCommand) -> anyhow::Result<()> {
    match cmd {
        CertsCommand::Dev { out } => {
            let dir = out.unwrap_or_else(|| default_key_dir().with_file_name("tls"));
            let files = write_dev_certs(&dir)?;
            for f in &files {
                println!("{}", f.display());
            }
            eprintln!("client certificate identity: {DEV_CLIENT_IDENTITY}");
            eprintln!(
                "serve with: carevault serve --tls-cert {d}/server.pem --tls-key {d}/server.key --tls-client-ca {d}/ca.pem",
                d = dir.display()
            );
            Ok(())
        }
    }
}
