//! `carevault token issue`.

use anyhow::Context;
use carevault::auth::policy::Policy;
use carevault::auth::token;
use carevault::cli::TokenIssueArgs;
use carevault::config::default_key_dir;
use carevault::keystore::{self, KeyPaths};

/// Prints a token signed by the dev issuer key.
pub fn issue(args: TokenIssueArgs) -> anyhow::Result<()> {
    warn_about(&args);
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

/// The server's default `--max-token-lifetime`.
const DEFAULT_MAX_LIFETIME: std::time::Duration = std::time::Duration::from_secs(3600);

/// Warns (on stderr; the token still goes to stdout) about tokens a server
/// with the default settings would not honour as the caller may expect.
fn warn_about(args: &TokenIssueArgs) {
    if args.ttl > DEFAULT_MAX_LIFETIME {
        eprintln!(
            "warning: --ttl {} is longer than the server's default --max-token-lifetime (1h): a server with that default refuses this token",
            humantime::format_duration(args.ttl)
        );
    }
    let builtin = Policy::default_policy().map(|p| p.role_names()).unwrap_or_default();
    for role in args.roles.iter().filter(|r| !builtin.contains(r)) {
        eprintln!(
            "warning: {role:?} is not a built-in role ({}): the default policy gives it nothing; map it to roles in a --policy file",
            builtin.join(", ")
        );
    }
}
