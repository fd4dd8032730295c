//! A PostgreSQL the user already has, named by a `postgres://` URL: the fleet starts no database, the nodes
//! connect (and migrate the schema) as the URL's role. The URL's password is a secret: it shows in no
//! `Debug` and no message; `fleetctl top` reads it from a private libpq password file the fleet writes in
//! `<dir>/external/pgpass` and removes when it stops.

use std::fmt;
use std::path::{Path, PathBuf};

use anyhow::Context;
use percent_encoding::percent_decode_str;
use secrecy::{ExposeSecret, SecretString};

use crate::files::fresh_dir;
use crate::postgres::write_password_file;
use crate::{Child, Component};

/// A `postgres://USER[:PASSWORD]@HOST[:PORT][,HOST…]/DATABASE[?PARAMS]` URL, password included.
#[derive(Clone)]
pub struct DatabaseUrl {
    url: SecretString,
}

/// The URL split at its user information: `scheme://`, `user[:password]`, `@host…`.
struct Parts<'a> {
    scheme: &'a str,
    user: &'a str,
    password: Option<&'a str>,
    rest: &'a str,
}

impl DatabaseUrl {
    /// Checks that `url` is a `postgres://` (or `postgresql://`) URL naming a user; the error never
    /// quotes the URL (it may hold a password).
    pub fn parse(url: &str) -> Result<DatabaseUrl, String> {
        let parts = split(url)?;
        if parts.user.is_empty() {
            return Err("the database URL names no user: postgres://USER:PASSWORD@HOST:PORT/DATABASE".into());
        }
        let query = parts.rest.split_once('?').map_or("", |(_, query)| query);
        if query.split('&').any(|param| param.starts_with("password=")) {
            return Err(
                "give the password before the host (postgres://USER:PASSWORD@HOST/…), not as ?password="
                    .into(),
            );
        }
        Ok(DatabaseUrl { url: url.into() })
    }

    /// The whole URL, password included: a secret, for the nodes' `DATABASE_URL` only.
    pub fn expose(&self) -> &str {
        self.url.expose_secret()
    }

    /// The URL without its password, to show and to hand to psql beside a password file.
    pub fn display_url(&self) -> String {
        let parts = self.parts();
        format!("{}{}{}", parts.scheme, parts.user, parts.rest)
    }

    /// The role, percent-decoded.
    pub fn user(&self) -> String {
        decode(self.parts().user)
    }

    /// The password, percent-decoded, if the URL has one.
    fn password(&self) -> Option<SecretString> {
        self.parts().password.map(|password| decode(password).into())
    }

    fn parts(&self) -> Parts<'_> {
        split(self.expose()).expect("checked by DatabaseUrl::parse")
    }
}

impl fmt::Debug for DatabaseUrl {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "DatabaseUrl({:?})", self.display_url())
    }
}

fn split(url: &str) -> Result<Parts<'_>, String> {
    let scheme_end = ["postgres://", "postgresql://"]
        .iter()
        .find(|scheme| url.starts_with(*scheme))
        .map(|scheme| scheme.len())
        .ok_or("the database URL must start with postgres:// or postgresql://")?;
    let (scheme, after) = url.split_at(scheme_end);
    let authority_end = after.find(['/', '?']).unwrap_or(after.len());
    let Some(at) = after[..authority_end].rfind('@') else {
        return Ok(Parts { scheme, user: "", password: None, rest: after });
    };
    let (userinfo, rest) = after.split_at(at);
    let (user, password) = match userinfo.split_once(':') {
        Some((user, password)) => (user, Some(password)),
        None => (userinfo, None),
    };
    Ok(Parts { scheme, user, password, rest })
}

fn decode(text: &str) -> String {
    percent_decode_str(text).decode_utf8_lossy().into_owned()
}

/// A database the fleet did not start: it only holds the password file that `fleetctl top` uses.
#[derive(Debug)]
pub struct ExternalDatabase {
    url: DatabaseUrl,
    dir: PathBuf,
}

impl ExternalDatabase {
    /// Writes `<fleet_dir>/external/pgpass` (mode 0600) with the URL's password; starts nothing.
    pub fn open(url: DatabaseUrl, fleet_dir: &Path) -> anyhow::Result<ExternalDatabase> {
        let dir = fleet_dir.join("external");
        fresh_dir(&dir, None)?;
        let database = ExternalDatabase { url, dir };
        let user = pgpass_escape(&database.url.user());
        let password = database.url.password().map(|p| SecretString::from(pgpass_escape(p.expose_secret())));
        let entries: Vec<(&str, &SecretString)> = password.iter().map(|p| (user.as_str(), p)).collect();
        write_password_file(&database.password_file(), &entries)
            .context("cannot write the external database's password file")?;
        Ok(database)
    }

    pub fn url(&self) -> &DatabaseUrl {
        &self.url
    }

    /// The directory holding the password file.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// A libpq password file with the URL's password (empty when the URL has none).
    pub fn password_file(&self) -> PathBuf {
        self.dir.join("pgpass")
    }

    /// Removes the password file.
    fn forget_password(&self) -> anyhow::Result<()> {
        match std::fs::remove_dir_all(&self.dir) {
            Err(e) if e.kind() != std::io::ErrorKind::NotFound => {
                Err(e).with_context(|| format!("cannot remove {}", self.dir.display()))
            }
            _ => Ok(()),
        }
    }
}

/// A component of no process of ours.
impl Component for ExternalDatabase {
    fn processes(&mut self) -> Vec<&mut Child> {
        Vec::new()
    }

    /// Its URL, without the password.
    fn address(&self) -> String {
        self.url.display_url()
    }

    /// Removes the password file; the database itself is left as it is.
    fn stop(&mut self) -> anyhow::Result<()> {
        self.forget_password()
    }
}

impl Drop for ExternalDatabase {
    fn drop(&mut self) {
        let _ = self.forget_password();
    }
}

/// A field of a libpq password file: `:` and `\` escaped with `\`.
fn pgpass_escape(field: &str) -> String {
    field.replace('\\', "\\\\").replace(':', "\\:")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_urls_password_shows_nowhere_but_in_the_url_itself() {
        let url =
            DatabaseUrl::parse("postgres://shop%40eu:s3cr%3At@db.example:6432,db2/shop?sslmode=require")
                .unwrap();
        assert_eq!(url.display_url(), "postgres://shop%40eu@db.example:6432,db2/shop?sslmode=require");
        assert_eq!(url.user(), "shop@eu");
        assert_eq!(url.password().as_ref().map(ExposeSecret::expose_secret), Some("s3cr:t"));
        assert!(!format!("{url:?}").contains("s3cr"), "{url:?}");
        assert_eq!(DatabaseUrl::parse("postgresql://u@h/d").unwrap().display_url(), "postgresql://u@h/d");
    }

    #[test]
    fn a_url_without_a_user_or_with_its_password_in_the_query_is_refused_without_quoting_it() {
        for url in [
            "postgres://h/d",
            "mysql://u:secret@h/d",
            "host=h password=secret",
            "postgres://u@h/d?password=secret",
        ] {
            let err = DatabaseUrl::parse(url).unwrap_err();
            assert!(!err.contains("secret"), "{err}");
        }
    }

    #[test]
    fn the_password_file_escapes_colons_and_backslashes_and_goes_on_stop() {
        let fleet = tempfile::tempdir().unwrap();
        let url = DatabaseUrl::parse("postgres://ann:a%3Ab%5Cc@127.0.0.1:5432/db").unwrap();
        let mut database = ExternalDatabase::open(url, fleet.path()).unwrap();
        let text = std::fs::read_to_string(database.password_file()).unwrap();
        assert_eq!(text, "*:*:*:ann:a\\:b\\\\c\n");
        database.stop().unwrap();
        assert!(database.processes().is_empty());
        assert!(!database.dir().exists());
    }
}
