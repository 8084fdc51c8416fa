//! `carevault token issue`.

use anyhow::Context;
use carevault::auth::token;
use carevault::cli::TokenIssueArgs;
use carevault::config::default_key_dir;
use carevault::keystore::{self, KeyPaths};

/// Prints a token signed by the dev issuer key.
pub fn issue(args: TokenIssueArgs) -> anyhow::Result<()> {
    let paths = KeyPaths { dir: args.key_dir.unwrap_or_else(default_key_dir) };
    let der = keystore::read_private(&paths.issuer_private())
        .with_context(|| "no dev issuer key; run `carevault init` (or `serve`) first, or pass --key-dir")?;
    let now = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH)?.as_secs();
    let ttl = i64::try_from(args.ttl.as_secs())?;
    let spec = token::TokenSpec {
        subject: args.sub,
        roles: args.roles,
        issuer: args.issuer,
        audience: args.audience,
        ttl_secs: ttl,
        not_before_offset_secs: 0,
    };
    let t = token::issue(&der, &spec, i64::try_from(now)?)?;
    println!("{t}");
    Ok(())
}
