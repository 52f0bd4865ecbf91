//! A root file system's users and groups (`/etc/passwd`, `/etc/group`) and the two ways
//! Docker resolves a user spec against them. The one home of these rules: the agent uses it to
//! run processes, the server for envd's users (homes, owners in listings), the image builder
//! for `USER` and `COPY --chown`. Parsing only: callers read the files their own safe way.
//!
//! - [`Users::exec_user`] is `USER` / `docker run --user` (runc's rules): `name`, `uid`,
//!   `name:group`, `uid:gid`; a name must exist (except `root`, which is uid 0 on any image,
//!   so minimal images without `/etc/passwd` still work); a uid without an entry runs with gid
//!   0 and home `/`; supplementary groups are those of `/etc/group` that list the user.
//! - [`Users::chown_owner`] is `COPY --chown` (BuildKit's rules): a name takes its entry's
//!   uid and gid, a bare uid is also the gid.

use std::fmt;

/// A user resolved for running a process or owning a file.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Identity {
    pub uid: u32,
    pub gid: u32,
    /// The passwd entry's name; the spec as given when there is no entry (e.g. `4242`).
    pub name: String,
    /// Whether `/etc/passwd` has an entry for this user.
    pub known: bool,
    pub home: String,
    /// Supplementary groups: every `/etc/group` entry listing the user's name, primary gid
    /// excluded.
    pub groups: Vec<u32>,
}

/// Why a user spec does not resolve.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum UserError {
    NoSuchUser(String),
    NoSuchGroup(String),
    /// Empty, or a malformed `user:group`.
    Invalid(String),
}

impl fmt::Display for UserError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            UserError::NoSuchUser(u) => write!(f, "no user {u:?} in /etc/passwd"),
            UserError::NoSuchGroup(g) => write!(f, "no group {g:?} in /etc/group"),
            UserError::Invalid(s) => {
                write!(f, "bad user {s:?} (want user, uid, user:group or uid:gid)")
            }
        }
    }
}

impl std::error::Error for UserError {}

#[derive(Debug, Clone)]
struct Entry {
    name: String,
    uid: u32,
    gid: u32,
    home: String,
}

#[derive(Debug, Clone)]
struct Group {
    name: String,
    gid: u32,
    members: Vec<String>,
}

/// A root file system's `/etc/passwd` and `/etc/group` (either may be empty or missing).
#[derive(Debug, Clone, Default)]
pub struct Users {
    users: Vec<Entry>,
    groups: Vec<Group>,
}

/// Where root lives on an image that does not say.
const ROOT_HOME: &str = "/root";

impl Users {
    /// Parses the two files' contents; malformed lines are skipped, as libc does.
    pub fn parse(passwd: &str, group: &str) -> Users {
        // name:password:uid:gid:gecos:home:shell
        let users = passwd
            .lines()
            .filter_map(|l| {
                let f: Vec<&str> = l.split(':').collect();
                if f.len() < 6 || f[0].is_empty() {
                    return None;
                }
                Some(Entry {
                    name: f[0].to_string(),
                    uid: f[2].parse().ok()?,
                    gid: f[3].parse().ok()?,
                    home: f[5].to_string(),
                })
            })
            .collect();
        // name:password:gid:member,member
        let groups = group
            .lines()
            .filter_map(|l| {
                let f: Vec<&str> = l.split(':').collect();
                if f.len() < 3 || f[0].is_empty() {
                    return None;
                }
                Some(Group {
                    name: f[0].to_string(),
                    gid: f[2].parse().ok()?,
                    members: f
                        .get(3)
                        .map(|m| {
                            m.split(',')
                                .filter(|s| !s.is_empty())
                                .map(str::to_string)
                                .collect()
                        })
                        .unwrap_or_default(),
                })
            })
            .collect();
        Users { users, groups }
    }

    /// The user a process runs as for `spec` (`USER` semantics; see the module docs).
    pub fn exec_user(&self, spec: &str) -> Result<Identity, UserError> {
        let (user, group) = split_spec(spec)?;
        let entry = self.entry(user)?;
        let mut id = match (entry, user.parse::<u32>()) {
            (Some(e), _) => Identity {
                uid: e.uid,
                gid: e.gid,
                name: e.name.clone(),
                known: true,
                home: e.home.clone(),
                groups: Vec::new(),
            },
            (None, Ok(uid)) => Identity {
                uid,
                gid: 0,
                name: user.to_string(),
                known: false,
                home: "/".into(),
                groups: Vec::new(),
            },
            (None, Err(_)) => Identity {
                // `entry` only returns no entry for a name when it is root.
                uid: 0,
                gid: 0,
                name: "root".into(),
                known: false,
                home: ROOT_HOME.into(),
                groups: Vec::new(),
            },
        };
        if let Some(g) = group {
            id.gid = self.group_id(g)?;
        }
        id.groups = self
            .groups
            .iter()
            .filter(|g| g.gid != id.gid && g.members.contains(&id.name))
            .map(|g| g.gid)
            .collect();
        id.groups.dedup();
        Ok(id)
    }

    /// The owner `COPY --chown=spec` gives files: `(uid, gid)` (see the module docs).
    pub fn chown_owner(&self, spec: &str) -> Result<(u32, u32), UserError> {
        let (user, group) = split_spec(spec)?;
        let (uid, mut gid) = match user.parse::<u32>() {
            Ok(uid) => (uid, uid),
            Err(_) => match self.entry(user)? {
                Some(e) => (e.uid, e.gid),
                None => (0, 0), // root without an entry
            },
        };
        if let Some(g) = group {
            gid = self.group_id(g)?;
        }
        Ok((uid, gid))
    }

    /// A uid's name for listings: the passwd name, else the number.
    pub fn user_name(&self, uid: u32) -> String {
        self.users
            .iter()
            .find(|u| u.uid == uid)
            .map(|u| u.name.clone())
            .unwrap_or_else(|| uid.to_string())
    }

    /// A gid's name for listings: the group name, else the number.
    pub fn group_name(&self, gid: u32) -> String {
        self.groups
            .iter()
            .find(|g| g.gid == gid)
            .map(|g| g.name.clone())
            .unwrap_or_else(|| gid.to_string())
    }

    /// The entry `user` names: by name first (a name may be all digits), then by uid. A name
    /// with no entry is an error, except `root`.
    fn entry(&self, user: &str) -> Result<Option<&Entry>, UserError> {
        if let Some(e) = self.users.iter().find(|u| u.name == user) {
            return Ok(Some(e));
        }
        match user.parse::<u32>() {
            Ok(uid) => Ok(self.users.iter().find(|u| u.uid == uid)),
            Err(_) if user == "root" => Ok(None),
            Err(_) => Err(UserError::NoSuchUser(user.to_string())),
        }
    }

    fn group_id(&self, group: &str) -> Result<u32, UserError> {
        if let Some(g) = self.groups.iter().find(|g| g.name == group) {
            return Ok(g.gid);
        }
        match group.parse::<u32>() {
            Ok(gid) => Ok(gid),
            Err(_) if group == "root" => Ok(0),
            Err(_) => Err(UserError::NoSuchGroup(group.to_string())),
        }
    }
}

fn split_spec(spec: &str) -> Result<(&str, Option<&str>), UserError> {
    let (user, group) = match spec.split_once(':') {
        Some((u, g)) => (u, Some(g)),
        None => (spec, None),
    };
    let bad = |s: &str| s.is_empty() || s.contains(':') || s.contains('\n');
    if bad(user) || group.is_some_and(bad) {
        return Err(UserError::Invalid(spec.to_string()));
    }
    Ok((user, group))
}

#[cfg(test)]
mod tests {
    use super::*;

    const PASSWD: &str = "root:x:0:0:root:/root:/bin/sh\n\
        nobody:x:65534:65534:nobody:/nonexistent:/usr/sbin/nologin\n\
        app:x:1000:1001::/home/app:/bin/sh\n\
        broken line\n\
        1234:x:77:77::/home/digits:/bin/sh\n";
    const GROUP: &str = "root:x:0:\nstaff:x:50:app,other\napp:x:1001:app\nwheel:x:10:app\n";

    fn users() -> Users {
        Users::parse(PASSWD, GROUP)
    }

    #[test]
    fn exec_user_follows_runc() {
        let u = users();
        let app = u.exec_user("app").unwrap();
        assert_eq!(
            (app.uid, app.gid, app.home.as_str()),
            (1000, 1001, "/home/app")
        );
        assert_eq!(
            app.groups,
            vec![50, 10],
            "the primary group is not repeated"
        );
        let by_uid = u.exec_user("1000").unwrap();
        assert_eq!((by_uid.name.as_str(), by_uid.gid), ("app", 1001));
        let nobody = u.exec_user("65534").unwrap();
        assert_eq!((nobody.gid, nobody.name.as_str()), (65534, "nobody"));
        // A uid without an entry: gid 0, home /, named by its number.
        let x = u.exec_user("4242").unwrap();
        assert_eq!(
            (x.uid, x.gid, x.home.as_str(), x.known),
            (4242, 0, "/", false)
        );
        assert_eq!(u.exec_user("4242:7").unwrap().gid, 7);
        assert_eq!(u.exec_user("app:staff").unwrap().gid, 50);
        assert_eq!(u.exec_user("app:root").unwrap().gid, 0);
        // A name made of digits is a name first.
        assert_eq!(u.exec_user("1234").unwrap().uid, 77);
        assert_eq!(
            u.exec_user("nope"),
            Err(UserError::NoSuchUser("nope".into()))
        );
        assert_eq!(
            u.exec_user("app:nogroup"),
            Err(UserError::NoSuchGroup("nogroup".into()))
        );
        for bad in ["", ":", "app:", ":staff", "a:b:c"] {
            assert!(
                matches!(u.exec_user(bad), Err(UserError::Invalid(_))),
                "{bad:?}"
            );
        }
    }

    #[test]
    fn root_exists_without_passwd() {
        let empty = Users::default();
        let root = empty.exec_user("root").unwrap();
        assert_eq!((root.uid, root.gid, root.home.as_str()), (0, 0, "/root"));
        assert_eq!(empty.exec_user("0").unwrap().home, "/");
        assert_eq!(empty.exec_user("root:root").unwrap().gid, 0);
        assert_eq!(empty.chown_owner("root").unwrap(), (0, 0));
        assert!(empty.exec_user("app").is_err());
        // With a passwd that has root, its entry wins.
        assert_eq!(users().exec_user("root").unwrap().name, "root");
    }

    #[test]
    fn chown_owner_follows_buildkit() {
        let u = users();
        assert_eq!(u.chown_owner("app").unwrap(), (1000, 1001));
        assert_eq!(u.chown_owner("4242").unwrap(), (4242, 4242));
        assert_eq!(u.chown_owner("1000").unwrap(), (1000, 1000));
        assert_eq!(u.chown_owner("app:staff").unwrap(), (1000, 50));
        assert_eq!(u.chown_owner("55:66").unwrap(), (55, 66));
        assert!(u.chown_owner("ghost").is_err());
    }

    #[test]
    fn names_for_listings() {
        let u = users();
        assert_eq!(u.user_name(1000), "app");
        assert_eq!(u.user_name(7), "7");
        assert_eq!(u.group_name(50), "staff");
        assert_eq!(u.group_name(7), "7");
    }
}
