//! A throwaway PostgreSQL cluster for tests: `initdb` in a temporary
//! directory, a server on a free loopback port (and a Unix socket in the same
//! directory), stopped and removed when dropped. [`shared`] is one cluster
//! per test process (a database per test), stopped by a watchdog when the
//! process exits.
//!
//! Shared by the black-box tests (`tests/carevault`) and the engine's own
//! tests (`src/storage/postgres/tests.rs`), which include this file.
//!
//! The server refuses to run as root, so as root the directory is handed to
//! the `postgres` user and every server binary runs through `runuser`.
//! Without the binaries (PATH or `/usr/lib/postgresql/*/bin`) a test skips
//! with a message, except under CI (`CI=true`), where it fails: `.ci/run`
//! installs them.

use std::path::PathBuf;
use std::process::Command;

/// A running throwaway cluster.
pub struct PgCluster {
    dir: tempfile::TempDir,
    bin: PathBuf,
    /// Its TCP port on 127.0.0.1.
    pub port: u16,
    as_postgres: bool,
}

/// The superuser the cluster is created with.
pub const SUPERUSER: &str = "carevault";

impl PgCluster {
    /// Starts a cluster, or `None` (with a message) where PostgreSQL is not
    /// installed outside CI.
    pub fn start() -> Option<PgCluster> {
        Self::start_inner(None)
    }

    /// [`PgCluster::start`] with TLS on (`ssl=on`) with this certificate and key (PEM).
    pub fn start_with_tls(cert: &std::path::Path, key: &std::path::Path) -> Option<PgCluster> {
        Self::start_inner(Some((cert, key)))
    }

    fn start_inner(tls: Option<(&std::path::Path, &std::path::Path)>) -> Option<PgCluster> {
        Self::or_skip(Self::try_start(tls))
    }

    fn or_skip(started: Result<PgCluster, String>) -> Option<PgCluster> {
        match started {
            Ok(c) => Some(c),
            Err(why) if std::env::var("CI").as_deref() != Ok("true") && why.starts_with("no PostgreSQL") => {
                eprintln!("skipping a PostgreSQL test: {why}");
                None
            }
            Err(why) => panic!("cannot start a PostgreSQL cluster: {why}"),
        }
    }

    fn try_start(tls: Option<(&std::path::Path, &std::path::Path)>) -> Result<PgCluster, String> {
        let bin = find_bin().ok_or("no PostgreSQL server binaries (initdb) on PATH or in /usr/lib/postgresql")?;
        let dir = tempfile::tempdir().map_err(|e| e.to_string())?;
        let as_postgres = is_root();
        if as_postgres {
            let (uid, gid) = postgres_ids()?;
            std::os::unix::fs::chown(dir.path(), Some(uid), Some(gid)).map_err(|e| e.to_string())?;
        }
        let port = free_port()?;
        let c = PgCluster { dir, bin, port, as_postgres };
        let data = c.data_dir();
        c.run("initdb", &["-D", &data, "-U", SUPERUSER, "--auth=trust", "--encoding=UTF8", "--no-sync"])?;
        let socket = c.dir.path().display().to_string();
        let mut options = format!("-p {port} -k {socket} -c listen_addresses=127.0.0.1 -c fsync=on");
        if let Some((cert, key)) = tls {
            // The server reads them as its own user, and wants the key private.
            for (from, name, mode) in [(cert, "server.crt", 0o644), (key, "server.key", 0o600)] {
                let to = c.dir.path().join(name);
                std::fs::copy(from, &to).map_err(|e| e.to_string())?;
                std::fs::set_permissions(&to, std::os::unix::fs::PermissionsExt::from_mode(mode))
                    .map_err(|e| e.to_string())?;
                if as_postgres {
                    let (uid, gid) = postgres_ids()?;
                    std::os::unix::fs::chown(&to, Some(uid), Some(gid)).map_err(|e| e.to_string())?;
                }
            }
            let d = c.dir.path().display();
            options.push_str(&format!(" -c ssl=on -c ssl_cert_file={d}/server.crt -c ssl_key_file={d}/server.key"));
        }
        c.pg_start(&options)?;
        Ok(c)
    }

    fn pg_start(&self, options: &str) -> Result<(), String> {
        let log = self.dir.path().join("server.log").display().to_string();
        self.run("pg_ctl", &["-D", &self.data_dir(), "-l", &log, "-o", options, "-w", "-t", "60", "start"]).map_err(
            |e| {
                let log = std::fs::read_to_string(&log).unwrap_or_default();
                format!("{e}\nserver log:\n{log}")
            },
        )
    }

    /// A streaming-replication standby of `primary` (`pg_basebackup -R`), on
    /// a port of its own; the primary then waits for it on every commit
    /// (`synchronous_standby_names = '*'`).
    pub fn standby_of(primary: &PgCluster) -> Option<PgCluster> {
        Self::or_skip(Self::try_standby(primary))
    }

    fn try_standby(primary: &PgCluster) -> Result<PgCluster, String> {
        let dir = tempfile::tempdir().map_err(|e| e.to_string())?;
        if primary.as_postgres {
            let (uid, gid) = postgres_ids()?;
            std::os::unix::fs::chown(dir.path(), Some(uid), Some(gid)).map_err(|e| e.to_string())?;
        }
        let port = free_port()?;
        let c = PgCluster { dir, bin: primary.bin.clone(), port, as_postgres: primary.as_postgres };
        let from = primary.port.to_string();
        c.run(
            "pg_basebackup",
            &["-D", &c.data_dir(), "-R", "-X", "stream", "-c", "fast", "-h", "127.0.0.1", "-p", &from, "-U", SUPERUSER],
        )?;
        let socket = c.dir.path().display().to_string();
        c.pg_start(&format!("-p {port} -k {socket} -c listen_addresses=127.0.0.1 -c fsync=on"))?;
        let sql = |q: &str| primary.psql(q);
        for _ in 0..100 {
            if sql("SELECT count(*) FROM pg_stat_replication WHERE state = 'streaming'")? == "1" {
                sql("ALTER SYSTEM SET synchronous_standby_names = '*'")?;
                sql("SELECT pg_reload_conf()")?;
                for _ in 0..100 {
                    if sql("SELECT sync_state FROM pg_stat_replication")? == "sync" {
                        return Ok(c);
                    }
                    std::thread::sleep(std::time::Duration::from_millis(100));
                }
                return Err("the standby never became synchronous".into());
            }
            std::thread::sleep(std::time::Duration::from_millis(100));
        }
        Err("the standby never started streaming".into())
    }

    /// One value `query` returns on database `postgres` (psql -At).
    pub fn psql(&self, query: &str) -> Result<String, String> {
        let out = Command::new(self.bin.join("psql"))
            .args(["-h", "127.0.0.1", "-p", &self.port.to_string(), "-U", SUPERUSER, "-d", "postgres", "-Atc", query])
            .output()
            .map_err(|e| e.to_string())?;
        if !out.status.success() {
            return Err(format!("psql: {}", String::from_utf8_lossy(&out.stderr)));
        }
        Ok(String::from_utf8_lossy(&out.stdout).trim().to_string())
    }

    /// SIGKILL to the postmaster: the server dies as in a power cut (its
    /// children notice and exit).
    pub fn kill9(&self) {
        let pid = std::fs::read_to_string(self.dir.path().join("data").join("postmaster.pid")).unwrap();
        let pid = pid.lines().next().unwrap().trim().to_string();
        let status = Command::new("kill").args(["-9", &pid]).status().unwrap();
        assert!(status.success(), "kill -9 {pid}");
    }

    /// Stops the server (fast shutdown: connections are cut), keeping its data.
    pub fn stop(&self) {
        self.run("pg_ctl", &["-D", &self.data_dir(), "-m", "fast", "-w", "stop"]).unwrap();
    }

    /// Starts a server stopped with [`PgCluster::stop`] again, on the same port.
    pub fn restart(&self) {
        let socket = self.dir.path().display().to_string();
        let port = self.port;
        self.pg_start(&format!("-p {port} -k {socket} -c listen_addresses=127.0.0.1 -c fsync=on")).unwrap();
    }

    /// Promotes a standby to primary, waiting until it takes writes.
    pub fn promote(&self) {
        self.run("pg_ctl", &["-D", &self.data_dir(), "-w", "promote"]).unwrap();
    }

    fn data_dir(&self) -> String {
        self.dir.path().join("data").display().to_string()
    }

    fn run(&self, program: &str, args: &[&str]) -> Result<(), String> {
        let path = self.bin.join(program);
        let mut cmd = if self.as_postgres {
            let mut c = Command::new("runuser");
            c.args(["-u", "postgres", "--"]).arg(&path);
            c
        } else {
            Command::new(&path)
        };
        let out = cmd.args(args).output().map_err(|e| format!("{}: {e}", path.display()))?;
        if out.status.success() {
            Ok(())
        } else {
            Err(format!("{program} failed: {}", String::from_utf8_lossy(&out.stderr)))
        }
    }

    /// The cluster's directory: its data directory (`data`) and server log (`server.log`).
    pub fn dir(&self) -> &std::path::Path {
        self.dir.path()
    }

    /// A libpq-style URL for `database` on this cluster.
    pub fn url(&self, database: &str) -> String {
        format!("postgres://{SUPERUSER}@127.0.0.1:{}/{database}", self.port)
    }
}

impl Drop for PgCluster {
    fn drop(&mut self) {
        let data = self.data_dir();
        let _ = self.run("pg_ctl", &["-D", &data, "-m", "immediate", "-w", "stop"]);
    }
}

fn find_bin() -> Option<PathBuf> {
    let on_path = std::env::var_os("PATH")
        .into_iter()
        .flat_map(|p| std::env::split_paths(&p).collect::<Vec<_>>())
        .find(|d| d.join("initdb").is_file());
    // Debian keeps the binaries per major version; PATH may hold only wrappers.
    let debian = std::fs::read_dir("/usr/lib/postgresql")
        .ok()
        .into_iter()
        .flatten()
        .filter_map(|e| e.ok().map(|e| e.path().join("bin")))
        .filter(|d| d.join("initdb").is_file())
        .max();
    debian.or(on_path).map(|d| std::fs::canonicalize(&d).unwrap_or(d))
}

fn is_root() -> bool {
    Command::new("id").arg("-u").output().map(|o| String::from_utf8_lossy(&o.stdout).trim() == "0").unwrap_or(false)
}

fn postgres_ids() -> Result<(u32, u32), String> {
    let id = |flag: &str| -> Result<u32, String> {
        let out = Command::new("id").args([flag, "postgres"]).output().map_err(|e| e.to_string())?;
        String::from_utf8_lossy(&out.stdout).trim().parse().map_err(|_| "no postgres user to run the server as".into())
    };
    Ok((id("-u")?, id("-g")?))
}

/// A loopback port nothing listens on now (the OS picks it).
fn free_port() -> Result<u16, String> {
    let l = std::net::TcpListener::bind("127.0.0.1:0").map_err(|e| e.to_string())?;
    l.local_addr().map(|a| a.port()).map_err(|e| e.to_string())
}

/// One cluster for the whole test process, or `None` where PostgreSQL is
/// not installed outside CI (see [`PgCluster::start`]). It is never
/// dropped: a watchdog process stops it and removes its directory once this
/// process has exited.
pub fn shared() -> Option<&'static PgCluster> {
    static SHARED: std::sync::OnceLock<Option<PgCluster>> = std::sync::OnceLock::new();
    SHARED
        .get_or_init(|| {
            let c = PgCluster::start()?;
            c.watch_this_process();
            Some(c)
        })
        .as_ref()
}

impl PgCluster {
    /// Stops the cluster and removes its directory when this process is gone.
    fn watch_this_process(&self) {
        let stop = format!(
            "{} {} -D {} -m immediate -w stop",
            if self.as_postgres { "runuser -u postgres --" } else { "" },
            self.bin.join("pg_ctl").display(),
            self.data_dir()
        );
        let script = format!(
            "while kill -0 {pid} 2>/dev/null; do sleep 0.5; done; {stop} >/dev/null 2>&1; rm -rf {dir}",
            pid = std::process::id(),
            dir = self.dir.path().display()
        );
        // In a process group of its own, so that killing the test run's group leaves it to clean up.
        let spawned = std::os::unix::process::CommandExt::process_group(Command::new("sh").args(["-c", &script]), 0)
            .stdin(std::process::Stdio::null())
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .spawn();
        if let Err(e) = spawned {
            panic!("cannot start the PostgreSQL watchdog: {e}");
        }
    }

    /// A new empty database on this cluster; returns its URL.
    pub fn fresh_database(&self) -> String {
        static NEXT: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
        let name = format!("t{}_{}", std::process::id(), NEXT.fetch_add(1, std::sync::atomic::Ordering::SeqCst));
        let out = Command::new(self.bin.join("createdb"))
            .args(["-h", "127.0.0.1", "-p", &self.port.to_string(), "-U", SUPERUSER, &name])
            .output()
            .unwrap_or_else(|e| panic!("createdb: {e}"));
        assert!(out.status.success(), "createdb failed: {}", String::from_utf8_lossy(&out.stderr));
        self.url(&name)
    }
}
