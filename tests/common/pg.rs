//! A real PostgreSQL for the tests: `initdb` and `pg_ctl` from the Debian `postgresql`
//! package in a temporary directory, on a free loopback port, fsync on. Run as the `postgres`
//! user when the tests run as root (initdb refuses root).

use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::time::{Duration, Instant};

pub struct Postgres {
    _tmp: tempfile::TempDir,
    pub data: PathBuf,
    pub port: u16,
    bin: PathBuf,
    /// (uid, gid) to run the server as.
    user: Option<(u32, u32)>,
}

/// Where the PostgreSQL server binaries are (`/usr/lib/postgresql/N/bin`, newest first).
fn bin_dir() -> PathBuf {
    let mut versions: Vec<PathBuf> = std::fs::read_dir("/usr/lib/postgresql")
        .map(|d| d.flatten().map(|e| e.path().join("bin")).collect())
        .unwrap_or_default();
    versions.retain(|p| p.join("initdb").exists());
    versions.sort();
    versions
        .pop()
        .expect("PostgreSQL server binaries (Debian package `postgresql`; softhsm/setup.sh --test installs it)")
}

fn postgres_user() -> Option<(u32, u32)> {
    if rustix_uid() != 0 {
        return None;
    }
    let passwd = std::fs::read_to_string("/etc/passwd").expect("/etc/passwd");
    let line = passwd
        .lines()
        .find(|l| l.starts_with("postgres:"))
        .expect("a `postgres` user (installed with the postgresql package)");
    let f: Vec<&str> = line.split(':').collect();
    Some((f[2].parse().unwrap(), f[3].parse().unwrap()))
}

fn rustix_uid() -> u32 {
    // The tests' own uid, from /proc (no libc call needed).
    let status = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
    status
        .lines()
        .find_map(|l| l.strip_prefix("Uid:"))
        .and_then(|v| v.split_whitespace().next())
        .and_then(|v| v.parse().ok())
        .unwrap_or(0)
}

pub fn free_port() -> u16 {
    super::free_port()
}

impl Postgres {
    /// A new cluster, started.
    pub fn start() -> Self {
        Self::start_with(&[])
    }

    /// A new cluster with extra `postgresql.conf` lines, started.
    pub fn start_with(conf: &[&str]) -> Self {
        let tmp = tempfile::tempdir().unwrap();
        let user = postgres_user();
        let data = tmp.path().join("data");
        let pg = Self {
            data,
            port: free_port(),
            bin: bin_dir(),
            user,
            _tmp: tmp,
        };
        pg.own(pg._tmp.path());
        let out = pg.run(
            "initdb",
            &[
                "-D",
                pg.data.to_str().unwrap(),
                "-U",
                "postgres",
                "--auth=trust",
                "--no-sync",
            ],
        );
        assert!(
            out.status.success(),
            "initdb: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        let mut extra = String::from("\nfsync = on\nwal_level = replica\nmax_wal_senders = 4\n");
        for l in conf {
            extra.push_str(l);
            extra.push('\n');
        }
        let conf_path = pg.data.join("postgresql.conf");
        let mut text = std::fs::read_to_string(&conf_path).unwrap();
        text.push_str(&extra);
        std::fs::write(&conf_path, text).unwrap();
        let hba = pg.data.join("pg_hba.conf");
        let mut text = std::fs::read_to_string(&hba).unwrap();
        text.push_str("\nhost replication postgres 127.0.0.1/32 trust\n");
        std::fs::write(&hba, text).unwrap();
        pg.pg_ctl_start();
        pg
    }

    /// Turn TLS on with a server certificate for `localhost` issued by a fresh CA; returns the
    /// CA's PEM file (what `storage.ca_file` names). Takes effect on reload.
    pub fn enable_tls(&self) -> PathBuf {
        let dir = self.data.clone();
        super::openssl::openssl_ca(&dir, "ca", "/CN=test database CA");
        super::openssl::openssl_server_cert(
            &dir,
            "server",
            &dir.join("ca.pem"),
            &dir.join("ca.key"),
            "DNS:localhost",
        );
        for f in ["server.key", "server.pem", "ca.pem"] {
            self.own(&dir.join(f));
        }
        std::fs::set_permissions(
            dir.join("server.key"),
            std::os::unix::fs::PermissionsExt::from_mode(0o600),
        )
        .unwrap();
        let conf = dir.join("postgresql.conf");
        let mut text = std::fs::read_to_string(&conf).unwrap();
        text.push_str("\nssl = on\nssl_cert_file = 'server.pem'\nssl_key_file = 'server.key'\n");
        std::fs::write(&conf, text).unwrap();
        self.psql("postgres", "SELECT pg_reload_conf()");
        std::thread::sleep(Duration::from_millis(500));
        let ca = self._tmp.path().join("database-ca.pem");
        std::fs::copy(dir.join("ca.pem"), &ca).unwrap();
        ca
    }

    fn own(&self, p: &Path) {
        if let Some((uid, gid)) = self.user {
            std::os::unix::fs::chown(p, Some(uid), Some(gid)).unwrap();
        }
    }

    fn run(&self, tool: &str, args: &[&str]) -> Output {
        let mut cmd = Command::new(self.bin.join(tool));
        cmd.args(args).current_dir(self._tmp.path());
        if let Some((uid, gid)) = self.user {
            cmd.uid(uid).gid(gid);
        }
        cmd.output().unwrap_or_else(|e| panic!("run {tool}: {e}"))
    }

    fn pg_ctl_start(&self) {
        let opts = format!(
            "-p {} -k {} -c listen_addresses=127.0.0.1",
            self.port,
            self._tmp.path().display()
        );
        let log = self._tmp.path().join(format!("pg-{}.log", self.port));
        let out = self.run(
            "pg_ctl",
            &[
                "-D",
                self.data.to_str().unwrap(),
                "-o",
                &opts,
                "-l",
                log.to_str().unwrap(),
                "-w",
                "-t",
                "60",
                "start",
            ],
        );
        assert!(
            out.status.success(),
            "pg_ctl start: {}\n{}",
            String::from_utf8_lossy(&out.stderr),
            std::fs::read_to_string(&log).unwrap_or_default()
        );
    }

    /// `postgresql://postgres@127.0.0.1:PORT/NAME`, creating database NAME.
    pub fn database(&self, name: &str) -> String {
        self.psql("postgres", &format!("CREATE DATABASE {name}"));
        self.url(name)
    }

    pub fn url(&self, name: &str) -> String {
        format!("postgresql://postgres@127.0.0.1:{}/{name}", self.port)
    }

    /// Run SQL; returns the output (unaligned, tuples only).
    pub fn psql(&self, db: &str, sql: &str) -> String {
        self.client(
            "psql",
            &["-d", db, "-v", "ON_ERROR_STOP=1", "-At", "-c", sql],
        )
        .trim()
        .to_owned()
    }

    /// `pg_dump` of `db` into `file`.
    pub fn dump(&self, db: &str, file: &Path) {
        self.client("pg_dump", &["-f", file.to_str().unwrap(), db]);
    }

    /// Run the SQL of `file` (a dump) in `db`.
    pub fn restore(&self, db: &str, file: &Path) {
        self.client(
            "psql",
            &[
                "-q",
                "-v",
                "ON_ERROR_STOP=1",
                "-d",
                db,
                "-f",
                file.to_str().unwrap(),
            ],
        );
    }

    /// A client tool connected to this server as `postgres`; panics with its stderr on
    /// failure; returns stdout.
    fn client(&self, tool: &str, args: &[&str]) -> String {
        let port = self.port.to_string();
        let out = Command::new(tool)
            .args(["-h", "127.0.0.1", "-p", &port, "-U", "postgres"])
            .args(args)
            .output()
            .unwrap_or_else(|e| panic!("{tool}: {e}"));
        assert!(
            out.status.success(),
            "{tool} {args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    /// The postmaster's PID.
    pub fn pid(&self) -> i32 {
        let text = std::fs::read_to_string(self.data.join("postmaster.pid")).unwrap();
        text.lines().next().unwrap().trim().parse().unwrap()
    }

    /// SIGKILL the postmaster and every backend at once: the whole server crashes.
    pub fn kill9(&self) {
        let pid = self.pid();
        let children = Command::new("pgrep")
            .args(["-P", &pid.to_string()])
            .output()
            .map(|o| String::from_utf8_lossy(&o.stdout).into_owned())
            .unwrap_or_default();
        let mut args = vec!["-KILL".to_owned(), pid.to_string()];
        args.extend(children.split_whitespace().map(str::to_owned));
        let _ = Command::new("kill").args(&args).status();
        let deadline = Instant::now() + Duration::from_secs(30);
        // Wait until nothing listens on the port any more (the backends are gone).
        while std::net::TcpStream::connect(("127.0.0.1", self.port)).is_ok() {
            assert!(Instant::now() < deadline, "PostgreSQL did not go away");
            std::thread::sleep(Duration::from_millis(50));
        }
        std::thread::sleep(Duration::from_millis(300));
        let _ = std::fs::remove_file(self.data.join("postmaster.pid"));
        let _ = std::fs::remove_file(
            self._tmp
                .path()
                .join(format!(".s.PGSQL.{}.lock", self.port)),
        );
    }

    /// Start again after [`Postgres::kill9`] (crash recovery replays the WAL).
    pub fn restart(&self) {
        self.pg_ctl_start();
    }

    /// A streaming standby of this cluster (`pg_basebackup -R`), started, on its own port.
    pub fn standby(&self) -> Postgres {
        let tmp = tempfile::tempdir().unwrap();
        let s = Postgres {
            data: tmp.path().join("data"),
            port: free_port(),
            bin: self.bin.clone(),
            user: self.user,
            _tmp: tmp,
        };
        s.own(s._tmp.path());
        let out = s.run(
            "pg_basebackup",
            &[
                "-h",
                "127.0.0.1",
                "-p",
                &self.port.to_string(),
                "-U",
                "postgres",
                "-D",
                s.data.to_str().unwrap(),
                "-R",
                "-X",
                "stream",
                "-c",
                "fast",
            ],
        );
        assert!(
            out.status.success(),
            "pg_basebackup: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        s.pg_ctl_start();
        s
    }

    /// Promote this standby to primary.
    pub fn promote(&self) {
        let out = self.run(
            "pg_ctl",
            &["-D", self.data.to_str().unwrap(), "-w", "promote"],
        );
        assert!(
            out.status.success(),
            "promote: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
}

impl Drop for Postgres {
    fn drop(&mut self) {
        let _ = self.run(
            "pg_ctl",
            &["-D", self.data.to_str().unwrap(), "-m", "immediate", "stop"],
        );
    }
}

/// Point a development configuration at a PostgreSQL database.
pub fn with_postgres(config: String, url: &str) -> String {
    format!("{config}\n[storage]\nbackend = \"postgres\"\nurl = \"{url}\"\n")
}
