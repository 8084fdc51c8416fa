//! A throwaway PostgreSQL cluster for tests: `initdb` in a temporary
//! directory, a server on a free loopback port (and a Unix socket in the same
//! directory), stopped and removed when dropped.
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
        match Self::try_start() {
            Ok(c) => Some(c),
            Err(why) if std::env::var("CI").as_deref() != Ok("true") && why.starts_with("no PostgreSQL") => {
                eprintln!("skipping a PostgreSQL test: {why}");
                None
            }
            Err(why) => panic!("cannot start a PostgreSQL cluster: {why}"),
        }
    }

    fn try_start() -> Result<PgCluster, String> {
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
        let options = format!("-p {port} -k {socket} -c listen_addresses=127.0.0.1 -c fsync=on");
        let log = c.dir.path().join("server.log").display().to_string();
        c.run("pg_ctl", &["-D", &data, "-l", &log, "-o", &options, "-w", "-t", "60", "start"]).map_err(|e| {
            let log = std::fs::read_to_string(&log).unwrap_or_default();
            format!("{e}\nserver log:\n{log}")
        })?;
        Ok(c)
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

#[tokio::test]
async fn a_throwaway_cluster_starts_takes_connections_and_commits_durably() {
    let Some(cluster) = PgCluster::start() else { return };
    let (client, conn) = tokio_postgres::connect(&cluster.url("postgres"), tokio_postgres::NoTls).await.unwrap();
    tokio::spawn(conn);
    let row = client.query_one("SHOW synchronous_commit", &[]).await.unwrap();
    assert_eq!(row.get::<_, String>(0), "on");
    let row = client.query_one("SHOW fsync", &[]).await.unwrap();
    assert_eq!(row.get::<_, String>(0), "on");
    client.batch_execute("CREATE DATABASE t").await.unwrap();
    let (db, conn) = tokio_postgres::connect(&cluster.url("t"), tokio_postgres::NoTls).await.unwrap();
    tokio::spawn(conn);
    db.batch_execute("CREATE TABLE x (id bigint PRIMARY KEY, b bytea NOT NULL)").await.unwrap();
    db.execute("INSERT INTO x VALUES ($1, $2)", &[&1i64, &vec![0u8, 1, 2]]).await.unwrap();
    let row = db.query_one("SELECT b FROM x WHERE id = 1", &[]).await.unwrap();
    assert_eq!(row.get::<_, Vec<u8>>(0), vec![0u8, 1, 2]);
}
