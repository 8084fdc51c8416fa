//! Command-line interface definitions (clap derive). The commands themselves
//! live in the binary (`src/commands/`).

use std::net::SocketAddr;
use std::path::PathBuf;

use clap::{Args, Parser, Subcommand, ValueEnum};

use crate::audit::ExpectedHead;

/// carevault: audited, encrypted patient records over gRPC.
#[derive(Debug, Parser)]
#[command(name = "carevault", version, about, propagate_version = true)]
pub struct Cli {
    /// Log format.
    #[arg(long, global = true, value_enum, default_value_t = LogFormat::Text, env = "CAREVAULT_LOG_FORMAT")]
    pub log_format: LogFormat,
    /// The command.
    #[command(subcommand)]
    pub command: Command,
}

/// Log output format.
#[derive(Debug, Clone, Copy, ValueEnum, PartialEq, Eq)]
pub enum LogFormat {
    /// Human-readable lines.
    Text,
    /// One JSON object per line.
    Json,
}

/// Subcommands.
#[derive(Debug, Subcommand)]
pub enum Command {
    /// Run the gRPC service (creates keys and data directory on first start).
    Serve(ServeArgs),
    /// Create the key and data directories without serving.
    Init(DirArgs),
    /// Verify the audit chain, offline (--data-dir) or against a server (--server).
    Verify(VerifyArgs),
    /// Development tokens.
    #[command(subcommand)]
    Token(TokenCommand),
    /// Development certificates.
    #[command(subcommand)]
    Certs(CertsCommand),
    /// Master key operations: against a running server (--server) or offline on a stopped data directory.
    Keys(KeysArgs),
    /// Back up a stopped data directory: a compacted copy of the database plus keycheck.json and erasure-keys (master keys are not copied).
    Backup(BackupArgs),
    /// A small client for trying the service by hand.
    Client(ClientArgs),
    /// Measure throughput and latency of audited operations (see BENCHMARKS.md).
    Bench(BenchArgs),
    /// The audit log's proofs: `audit prove SEQ` prints an entry with its inclusion proof.
    Audit(AuditArgs),
    /// Check an inclusion proof document (from `audit prove`) offline, with the log's key only.
    VerifyProof(VerifyProofArgs),
    /// Witness a carevault log: accept only checkpoints consistent with the last one accepted, and cosign them.
    #[command(subcommand)]
    Witness(WitnessCommand),
}

/// `witness` subcommands.
#[derive(Debug, Subcommand)]
pub enum WitnessCommand {
    /// Create a witness key (a new file, mode 0600) and print its cosigner verifier key.
    Init {
        /// Where to write the key (64 hex digits: an Ed25519 seed).
        #[arg(long)]
        key: PathBuf,
        /// The witness's name (e.g. witness.compliance.example/w1).
        #[arg(long)]
        name: String,
    },
    /// Fetch the newest checkpoint and a consistency proof from the one accepted last, check both,
    /// record the new one (atomically) and cosign it. Exit 1 with a class on a refusal.
    Run(Box<WitnessRunArgs>),
}

/// `witness run` options.
#[derive(Debug, Args)]
pub struct WitnessRunArgs {
    /// The log's server.
    #[arg(long)]
    pub server: String,
    /// Bearer token with audit.read.
    #[arg(long, env = "CAREVAULT_TOKEN", hide_env_values = true)]
    pub token: String,
    /// TLS for --server.
    #[command(flatten)]
    pub tls: TlsClientArgs,
    /// The log's verifier key (as `keys log-key` prints it); repeat it across a log key rotation.
    #[arg(long, value_name = "VKEY", required = true)]
    pub log_key: Vec<String>,
    /// The witness key (from `witness init`).
    #[arg(long)]
    pub key: PathBuf,
    /// The witness's name (as given to `witness init`).
    #[arg(long)]
    pub name: String,
    /// The witness's state: the checkpoint it accepted last (created on the first run).
    #[arg(long)]
    pub state: PathBuf,
    /// Keep witnessing, once per interval, until stopped (default: once).
    #[arg(long, value_parser = humantime::parse_duration)]
    pub interval: Option<std::time::Duration>,
    /// Machine-readable output.
    #[arg(long)]
    pub json: bool,
}

/// `audit` options.
#[derive(Debug, Args)]
pub struct AuditArgs {
    /// A running server's URL.
    #[arg(long, global = true)]
    pub server: Option<String>,
    /// Bearer token with audit.read.
    #[arg(long, env = "CAREVAULT_TOKEN", hide_env_values = true, global = true)]
    pub token: Option<String>,
    /// TLS for --server.
    #[command(flatten)]
    pub tls: TlsClientArgs,
    /// What to do.
    #[command(subcommand)]
    pub command: AuditCommand,
}

/// `audit` subcommands.
#[derive(Debug, Subcommand)]
pub enum AuditCommand {
    /// Print entry SEQ, its inclusion proof and the signed checkpoint it is
    /// proved against, as one self-contained JSON document.
    Prove {
        /// The entry's sequence.
        #[arg(value_name = "SEQ")]
        sequence: u64,
        /// Prove against the checkpoint of this tree size (default: the newest).
        #[arg(long, default_value_t = 0)]
        tree_size: u64,
    },
}

/// `verify-proof` options.
#[derive(Debug, Args)]
pub struct VerifyProofArgs {
    /// The proof document (`-` for standard input).
    #[arg(value_name = "FILE")]
    pub file: PathBuf,
    /// The log's verifier key (as `keys log-key` prints it). May be repeated.
    #[arg(long, value_name = "VKEY", required = true)]
    pub log_key: Vec<String>,
    /// Machine-readable output.
    #[arg(long)]
    pub json: bool,
}

/// `backup` options.
#[derive(Debug, Args)]
pub struct BackupArgs {
    /// The data directory to back up (no server may be using it).
    #[arg(long, env = "CAREVAULT_DATA_DIR")]
    pub data_dir: Option<PathBuf>,
    /// The store, if not sled under the data directory. A PostgreSQL database is backed up with
    /// PostgreSQL's own tools (this copies the data directory's key state and says which).
    #[arg(long, env = "CAREVAULT_STORE", hide_env_values = true)]
    pub store: Option<String>,
    /// Where to write the backup (must not exist).
    #[arg(long)]
    pub out: PathBuf,
}

/// `bench` options.
#[derive(Debug, Args)]
pub struct BenchArgs {
    /// Patients to preload (each with 1-3 coverages).
    #[arg(long, default_value_t = 2000)]
    pub patients: usize,
    /// How long each workload runs.
    #[arg(long, default_value = "10s", value_parser = humantime::parse_duration)]
    pub duration: std::time::Duration,
    /// Run each workload for exactly this many operations instead of for `--duration`: two
    /// builds (or two counts) then do the same work, which instruction counts under valgrind
    /// need to compare.
    #[arg(long)]
    pub ops: Option<u64>,
    /// Requests in flight.
    #[arg(long, default_value_t = 64)]
    pub concurrency: usize,
    /// HTTP/2 connections the requests are spread over.
    #[arg(long, default_value_t = 4)]
    pub channels: usize,
    /// Workloads to run, in order. `baseline` is the health check; `echo` is the bench's own
    /// floor service (the same token and a stored patient's message, no storage, crypto or audit),
    /// which the `x echo` ratios are taken against; `echo-bare` (not in the default list) is the
    /// same call without the bearer token, to measure what carrying it costs. Key jobs (not in the default list) run while the read workload
    /// runs and report their own rate: `rewrap` rotates the master key and rewraps every data key,
    /// `reencrypt` gives every patient a new data key and re-seals every record version,
    /// `blind-index` rotates the blind-index key (rotating the master key first if needed).
    #[arg(
        long,
        value_delimiter = ',',
        default_value = "baseline,echo,read,create,update,search,active-coverage,mixed"
    )]
    pub workloads: Vec<String>,
    /// sled cache for the in-process server, MiB.
    #[arg(long, default_value_t = 256)]
    pub cache_mb: u64,
    /// Where the in-process server keeps its data (default: a temporary directory that is removed).
    #[arg(long)]
    pub data_dir: Option<PathBuf>,
    /// The in-process server's store: `sled:PATH`, or a PostgreSQL URL naming an empty database
    /// (default: sled in the data directory).
    #[arg(long, env = "CAREVAULT_STORE", hide_env_values = true, conflicts_with = "server")]
    pub store: Option<String>,
    /// Machine-readable output.
    #[arg(long)]
    pub json: bool,
    /// The in-process server signs a checkpoint once this many audit entries were added since
    /// the last one (as `serve --checkpoint-every`), so that the cost of a policy can be measured.
    #[arg(long, default_value_t = 1000, value_parser = clap::value_parser!(u64).range(1..))]
    pub checkpoint_every: u64,
    /// And at least this often while entries are added (as `serve --checkpoint-interval`).
    #[arg(long, default_value = "1s", value_parser = humantime::parse_duration)]
    pub checkpoint_interval: std::time::Duration,
    /// Also time `verify` over a synthetic chain of this many entries (0 = skip).
    #[arg(long, default_value_t = 0)]
    pub verify_entries: u64,
    /// Also build a sled store of this many audit entries through the sequencer and time
    /// inclusion proofs in it, as the server computes them (0 = skip).
    #[arg(long, default_value_t = 0)]
    pub proof_entries: u64,
    /// Serve the in-process server over mutual TLS (a development CA, server and client
    /// certificates generated into the temporary directory), as a production deployment would.
    #[arg(long, conflicts_with = "server")]
    pub tls: bool,
    /// Load an already running server instead of starting one (http:// or https://). It needs a
    /// token (--token) whose roles allow the workloads: front_desk and compliance, plus key_admin
    /// for the key jobs. Disk syncs are then not counted (the server's counter is not visible).
    #[arg(long, conflicts_with = "data_dir")]
    pub server: Option<String>,
    /// Bearer token for --server.
    #[arg(long, env = "CAREVAULT_TOKEN", hide_env_values = true, requires = "server")]
    pub token: Option<String>,
    /// TLS for --server.
    #[command(flatten)]
    pub client_tls: TlsClientArgs,
}

/// Where the data and keys are.
#[derive(Debug, Args, Clone)]
pub struct DirArgs {
    /// Data directory (database and key-check file).
    #[arg(long, env = "CAREVAULT_DATA_DIR", global = true)]
    pub data_dir: Option<PathBuf>,
    /// Key directory (master keys, dev token issuer key); keep it outside the data directory.
    #[arg(long, env = "CAREVAULT_KEY_DIR", global = true)]
    pub key_dir: Option<PathBuf>,
    /// The store: `sled:PATH` (`sled:` alone: `db` under the data directory, the default) or a
    /// PostgreSQL URL (`postgres://` or `postgresql://`, libpq-style options).
    #[arg(long, env = "CAREVAULT_STORE", global = true, hide_env_values = true)]
    pub store: Option<String>,
}

/// Where master keys come from (default: key files in the key directory).
#[derive(Debug, Args, Clone, Default)]
pub struct KeyCustodyArgs {
    /// Command whose standard output is master key version $CAREVAULT_KEY_VERSION (64 hex digits),
    /// run with `sh -c`: how a KMS, an HSM or a password manager plugs in.
    #[arg(long, env = "CAREVAULT_MASTER_KEY_COMMAND", global = true, conflicts_with_all = ["master_key_credentials", "insecure_dev_env_keys"])]
    pub master_key_command: Option<String>,
    /// Read master keys from systemd credentials: $CREDENTIALS_DIRECTORY/carevault-master-<N>.
    #[arg(long, global = true, conflicts_with = "insecure_dev_env_keys")]
    pub master_key_credentials: bool,
    /// Development only: read master keys from CAREVAULT_MASTER_KEY_<N> environment variables.
    #[arg(long, global = true)]
    pub insecure_dev_env_keys: bool,
}

/// `serve` options.
#[derive(Debug, Args)]
pub struct ServeArgs {
    /// Directories.
    #[command(flatten)]
    pub dirs: DirArgs,
    /// Master key custody.
    #[command(flatten)]
    pub custody: KeyCustodyArgs,
    /// Address to listen on.
    #[arg(long, env = "CAREVAULT_LISTEN", default_value = "127.0.0.1:50051")]
    pub listen: SocketAddr,
    /// Token issuer's Ed25519 public key (PEM). Default: the dev issuer key in the key directory.
    #[arg(long, env = "CAREVAULT_ISSUER_PUBLIC_KEY")]
    pub issuer_public_key: Option<PathBuf>,
    /// Longest token lifetime accepted (e.g. 1h, 15m).
    #[arg(long, env = "CAREVAULT_MAX_TOKEN_LIFETIME", default_value = "1h", value_parser = humantime::parse_duration)]
    pub max_token_lifetime: std::time::Duration,
    /// Clock skew tolerated on token times.
    #[arg(long, env = "CAREVAULT_CLOCK_SKEW", default_value = "30s", value_parser = humantime::parse_duration)]
    pub clock_skew: std::time::Duration,
    /// Required token issuer (`iss`).
    #[arg(long, env = "CAREVAULT_TOKEN_ISSUER", default_value = crate::auth::token::DEFAULT_ISSUER)]
    pub token_issuer: String,
    /// Required token audience (`aud`).
    #[arg(long, env = "CAREVAULT_TOKEN_AUDIENCE", default_value = crate::auth::token::DEFAULT_AUDIENCE)]
    pub token_audience: String,
    /// sled page cache size in MiB (bounds memory).
    #[arg(long, env = "CAREVAULT_CACHE_MB", default_value_t = 256)]
    pub cache_mb: u64,
    /// How many unwrapped data keys to keep in memory (about 200 bytes each; 0 keeps none).
    #[arg(long, env = "CAREVAULT_KEY_CACHE", default_value_t = crate::app::DEFAULT_KEY_CACHE)]
    pub key_cache: usize,
    /// Server certificate chain (PEM). With --tls-key, serves TLS 1.2+ only.
    #[arg(long, env = "CAREVAULT_TLS_CERT", requires = "tls_key")]
    pub tls_cert: Option<PathBuf>,
    /// Server private key (PEM).
    #[arg(long, env = "CAREVAULT_TLS_KEY", requires = "tls_cert")]
    pub tls_key: Option<PathBuf>,
    /// CA for client certificates (PEM): enables mutual TLS.
    #[arg(long, env = "CAREVAULT_TLS_CLIENT_CA", requires = "tls_cert")]
    pub tls_client_ca: Option<PathBuf>,
    /// Refuse connections without a valid client certificate (default: optional).
    #[arg(long, env = "CAREVAULT_REQUIRE_CLIENT_CERT", requires = "tls_client_ca")]
    pub require_client_cert: bool,
    /// Allow plaintext on a non-loopback address (only behind something else that encrypts).
    #[arg(long)]
    pub insecure_plaintext: bool,
    /// Access policy (TOML). Default: the embedded policy (token roles claim -> built-in roles).
    #[arg(long, env = "CAREVAULT_POLICY")]
    pub policy: Option<PathBuf>,
    /// Requests per second per principal (0 = no limit).
    #[arg(long, env = "CAREVAULT_RATE_LIMIT", default_value_t = 2000)]
    pub rate_limit: u32,
    /// Burst allowance per principal above the rate.
    #[arg(long, env = "CAREVAULT_RATE_BURST", default_value_t = 4000)]
    pub rate_burst: u32,
    /// Requests processed at once across all callers.
    #[arg(long, env = "CAREVAULT_MAX_CONCURRENT", default_value_t = 1024)]
    pub max_concurrent: usize,
    /// How long a break-glass grant lasts.
    #[arg(long, env = "CAREVAULT_BREAK_GLASS_TTL", default_value = "60m", value_parser = humantime::parse_duration)]
    pub break_glass_ttl: std::time::Duration,
    /// The audit log's origin, named in its checkpoints and by its log key
    /// (used when the log key is created; default: carevault.local/audit/<id of this log>).
    #[arg(long, env = "CAREVAULT_LOG_ORIGIN")]
    pub log_origin: Option<String>,
    /// Sign a checkpoint once this many audit entries were added since the last one.
    #[arg(long, env = "CAREVAULT_CHECKPOINT_EVERY", default_value_t = 1000, value_parser = clap::value_parser!(u64).range(1..))]
    pub checkpoint_every: u64,
    /// And at least this often while entries are added.
    #[arg(long, env = "CAREVAULT_CHECKPOINT_INTERVAL", default_value = "1s", value_parser = humantime::parse_duration)]
    pub checkpoint_interval: std::time::Duration,
}

/// `keys` options. Give --server (with --token and TLS options) for a running
/// server; otherwise the command works offline on --data-dir/--key-dir, which
/// must not be in use by a server.
#[derive(Debug, Args)]
pub struct KeysArgs {
    /// A running server's URL.
    #[arg(long, global = true)]
    pub server: Option<String>,
    /// Bearer token with keys.admin (role key_admin), for --server.
    #[arg(long, env = "CAREVAULT_TOKEN", hide_env_values = true, global = true)]
    pub token: Option<String>,
    /// TLS for --server.
    #[command(flatten)]
    pub tls: TlsClientArgs,
    /// Directories, for offline use.
    #[command(flatten)]
    pub dirs: DirArgs,
    /// Master key custody, for offline use.
    #[command(flatten)]
    pub custody: KeyCustodyArgs,
    /// Machine-readable output.
    #[arg(long, global = true)]
    pub json: bool,
    /// What to do.
    #[command(subcommand)]
    pub command: KeysCommand,
}

/// Key operations.
#[derive(Debug, Subcommand)]
pub enum KeysCommand {
    /// Versions, primary, what depends on each version, the rewrap job.
    Status,
    /// Print the audit log's verifier key (vkey: origin+keyid+base64), for
    /// `verify --log-key`, `verify-proof` and witnesses (offline: from keycheck.json).
    LogKey,
    /// Add a master key version and make it primary.
    Rotate,
    /// Add an audit log key version and make it the one that signs checkpoints (older ones still verify theirs).
    RotateLogKey,
    /// Rewrap every data key and note onto the primary version (background job; shows progress).
    Rewrap {
        /// Count only.
        #[arg(long)]
        dry_run: bool,
        /// Data keys per second at most (0 = unlimited).
        #[arg(long, default_value_t = 0)]
        max_per_second: u32,
        /// Start the job and return without waiting (online only).
        #[arg(long)]
        no_wait: bool,
    },
    /// Stop a version from decrypting (refused while anything depends on it).
    Retire {
        /// The master key version.
        #[arg(value_name = "VERSION")]
        key_version: u32,
    },
    /// Remove a retired version's material for good.
    Destroy {
        /// The master key version.
        #[arg(value_name = "VERSION")]
        key_version: u32,
    },
    /// New data keys and fresh ciphertexts (suspected data-key compromise), for one patient or all.
    Reencrypt {
        /// One patient (default: every patient).
        #[arg(long)]
        patient: Option<String>,
        /// Patients per second at most (0 = unlimited).
        #[arg(long, default_value_t = 0)]
        max_per_second: u32,
        /// Start the job and return without waiting (online only).
        #[arg(long)]
        no_wait: bool,
    },
    /// Rotate the blind-index key to the primary version: build the new search index beside the old one, switch, drop the old (background job; shows progress).
    RotateBlindIndex {
        /// Start the job and return without waiting (online only).
        #[arg(long)]
        no_wait: bool,
    },
    /// Erase one patient by crypto-shredding (needs patients.erase; refused under a legal hold).
    Erase {
        /// The patient id.
        #[arg(long)]
        patient: String,
        /// Why (required; stored sealed, never in the audit entry).
        #[arg(long)]
        reason: String,
    },
}

/// `certs` subcommands.
#[derive(Debug, Subcommand)]
pub enum CertsCommand {
    /// Generate a development CA, a localhost server certificate and a client certificate (never overwrites).
    Dev {
        /// Output directory (default: tls/ beside the key directory, e.g. ~/.config/carevault/tls).
        #[arg(long)]
        out: Option<PathBuf>,
    },
}

/// How a client reaches the server over TLS.
#[derive(Debug, Args, Clone, Default)]
pub struct TlsClientArgs {
    /// CA certificate (PEM) that signed the server's certificate; use with an https:// URL.
    #[arg(long, env = "CAREVAULT_TLS_CA", global = true)]
    pub tls_ca: Option<PathBuf>,
    /// Client certificate (PEM) for mutual TLS.
    #[arg(long, env = "CAREVAULT_TLS_CLIENT_CERT", requires = "tls_client_key", global = true)]
    pub tls_client_cert: Option<PathBuf>,
    /// Client private key (PEM).
    #[arg(long, env = "CAREVAULT_TLS_CLIENT_KEY", requires = "tls_client_cert", global = true)]
    pub tls_client_key: Option<PathBuf>,
    /// Server name to verify (default: the URL's host).
    #[arg(long, global = true)]
    pub tls_domain: Option<String>,
}

/// `verify` options.
#[derive(Debug, Args)]
pub struct VerifyArgs {
    /// Verify the chain stored in this data directory (the server must be stopped).
    #[arg(long, env = "CAREVAULT_DATA_DIR", conflicts_with = "server")]
    pub data_dir: Option<PathBuf>,
    /// Verify the chain in this store: `sled:PATH` (the server must be stopped) or a PostgreSQL URL
    /// (read in read-only transactions; servers may keep running).
    #[arg(long, env = "CAREVAULT_STORE", hide_env_values = true, conflicts_with = "server")]
    pub store: Option<String>,
    /// Verify against a running server (needs a token with audit.read).
    #[arg(long)]
    pub server: Option<String>,
    /// Bearer token for --server.
    #[arg(long, env = "CAREVAULT_TOKEN", hide_env_values = true)]
    pub token: Option<String>,
    /// TLS for --server.
    #[command(flatten)]
    pub tls: TlsClientArgs,
    /// A head recorded earlier (SEQ:HASH) that must still be on the chain.
    #[arg(long)]
    pub expect_head: Option<ExpectedHead>,
    /// Verify only what came after a head verified earlier (SEQ:HASH): the
    /// entry after SEQ must link to HASH. Without it, verification starts at genesis.
    #[arg(long, value_name = "SEQ:HASH")]
    pub from: Option<ExpectedHead>,
    /// A signed checkpoint saved earlier (a file holding its note): the log
    /// must contain it and have only grown since. May be repeated.
    #[arg(long, value_name = "FILE")]
    pub checkpoint: Vec<PathBuf>,
    /// The log's verifier key (`origin+keyid+base64`, as `keys log-key` prints
    /// it) to check checkpoints with. Offline, the key state's keys are used
    /// if none is given; with --server it is needed to check signatures. May be repeated.
    #[arg(long, value_name = "VKEY")]
    pub log_key: Vec<String>,
    /// A witness's cosigner key (as `witness init` prints it). With it, the newest checkpoint
    /// of the log cosigned by --min-witnesses of these witnesses is found and the log held to it
    /// like a saved checkpoint; none found fails as `unwitnessed`. May be repeated.
    #[arg(long, value_name = "VKEY")]
    pub witness_key: Vec<String>,
    /// How many of the --witness-key witnesses must have cosigned that checkpoint.
    #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u64).range(1..), requires = "witness_key")]
    pub min_witnesses: u64,
    /// Machine-readable output.
    #[arg(long)]
    pub json: bool,
}

/// `token` subcommands.
#[derive(Debug, Subcommand)]
pub enum TokenCommand {
    /// Mint a token signed by the local dev issuer key.
    Issue(TokenIssueArgs),
}

/// `token issue` options.
#[derive(Debug, Args)]
pub struct TokenIssueArgs {
    /// Subject: the unique principal.
    #[arg(long)]
    pub sub: String,
    /// Roles claim (repeat or comma-separate), e.g. front_desk,compliance.
    #[arg(long = "role", value_delimiter = ',', required = true)]
    pub roles: Vec<String>,
    /// Issuer (`iss`).
    #[arg(long, default_value = crate::auth::token::DEFAULT_ISSUER)]
    pub issuer: String,
    /// Audience (`aud`).
    #[arg(long, default_value = crate::auth::token::DEFAULT_AUDIENCE)]
    pub audience: String,
    /// Lifetime (e.g. 15m, 1h).
    #[arg(long, default_value = "15m", value_parser = humantime::parse_duration)]
    pub ttl: std::time::Duration,
    /// Key directory holding issuer-ed25519.pk8.
    #[arg(long, env = "CAREVAULT_KEY_DIR")]
    pub key_dir: Option<PathBuf>,
}

/// `client` options.
#[derive(Debug, Args)]
pub struct ClientArgs {
    /// Server URL.
    #[arg(long, env = "CAREVAULT_SERVER", default_value = "http://127.0.0.1:50051", global = true)]
    pub server: String,
    /// Bearer token.
    #[arg(long, env = "CAREVAULT_TOKEN", hide_env_values = true, global = true)]
    pub token: Option<String>,
    /// Purpose of use sent as x-purpose-of-use (HL7 PurposeOfUse, e.g. TREAT, HPAYMT).
    #[arg(long, env = "CAREVAULT_PURPOSE", global = true)]
    pub purpose: Option<String>,
    /// Break-glass reason (x-break-glass-reason; with --purpose ETREAT).
    #[arg(long, global = true)]
    pub break_glass_reason: Option<String>,
    /// TLS.
    #[command(flatten)]
    pub tls: TlsClientArgs,
    /// What to do.
    #[command(subcommand)]
    pub command: ClientCommand,
}

/// Client operations. JSON in and out uses the proto3 JSON mapping.
#[derive(Debug, Subcommand)]
pub enum ClientCommand {
    /// Create a patient from a JSON Patient (file path or - for stdin).
    CreatePatient {
        /// JSON file or -.
        json: PathBuf,
    },
    /// Get a patient.
    GetPatient {
        /// Patient id.
        id: String,
    },
    /// Replace a patient from a JSON Patient carrying its id and the version last read (file or -).
    UpdatePatient {
        /// JSON file or -.
        json: PathBuf,
    },
    /// Soft-delete a patient at the version last read.
    DeletePatient {
        /// Patient id.
        id: String,
        /// The version last read (the delete fails with ABORTED if it is stale).
        #[arg(long)]
        expected_version: i64,
    },
    /// Every version of a patient, oldest first.
    PatientHistory {
        /// Patient id.
        id: String,
    },
    /// Search patients.
    Search {
        /// Identifier as SYSTEM=VALUE.
        #[arg(long, conflicts_with_all = ["family", "member_id"])]
        identifier: Option<String>,
        /// Family name (with --birth-date).
        #[arg(long, requires = "birth_date")]
        family: Option<String>,
        /// Birth date.
        #[arg(long)]
        birth_date: Option<String>,
        /// Insurance member id.
        #[arg(long)]
        member_id: Option<String>,
    },
    /// List patients (first page).
    ListPatients {
        /// Page size.
        #[arg(long, default_value_t = 20)]
        page_size: i32,
    },
    /// Add a coverage from a JSON Coverage (file path or -).
    AddCoverage {
        /// JSON file or -.
        json: PathBuf,
    },
    /// Get a coverage.
    GetCoverage {
        /// Coverage id.
        id: String,
    },
    /// Replace a coverage from a JSON Coverage carrying its id and the version last read (file or -).
    UpdateCoverage {
        /// JSON file or -.
        json: PathBuf,
    },
    /// Soft-delete a coverage at the version last read.
    DeleteCoverage {
        /// Coverage id.
        id: String,
        /// The version last read (the delete fails with ABORTED if it is stale).
        #[arg(long)]
        expected_version: i64,
    },
    /// List a patient's coverages.
    ListCoverages {
        /// Patient id.
        patient_id: String,
    },
    /// Coverages in force on a date.
    ActiveCoverage {
        /// Patient id.
        patient_id: String,
        /// Date of service (YYYY-MM-DD).
        #[arg(long)]
        date: String,
    },
    /// Show the newest audit events.
    AuditTail {
        /// How many.
        #[arg(long, default_value_t = 20)]
        count: usize,
        /// Only events naming this patient.
        #[arg(long)]
        patient_id: Option<String>,
    },
    /// Show the audit head (record it to detect truncation later).
    AuditHead,
    /// Flag a patient restricted (or clear it with --restricted false).
    SetRestriction {
        /// Patient id.
        patient_id: String,
        /// true or false.
        #[arg(long, default_value_t = true, action = clap::ArgAction::Set)]
        restricted: bool,
    },
    /// Place a legal hold on a patient (or lift it with --hold false); a held patient cannot be erased.
    SetLegalHold {
        /// Patient id.
        patient_id: String,
        /// true or false.
        #[arg(long, default_value_t = true, action = clap::ArgAction::Set)]
        hold: bool,
    },
    /// List break-glass grants (the review queue).
    BreakGlassQueue {
        /// pending, reviewed or all.
        #[arg(long, default_value = "pending")]
        state: String,
    },
    /// Mark a break-glass grant reviewed.
    ReviewGrant {
        /// Grant id.
        grant_id: String,
        /// Review note.
        #[arg(long)]
        note: String,
    },
}

#[cfg(test)]
mod tests {
    #[test]
    fn the_command_line_definition_is_consistent() {
        use clap::CommandFactory;
        super::Cli::command().debug_assert();
    }
}
