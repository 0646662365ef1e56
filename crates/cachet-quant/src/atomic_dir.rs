//! Replacing a whole directory atomically: [`DirSave`] and [`recover`].
//!
//! A save writes the complete new checkpoint into `new/` of a work folder beside the target,
//! `PARENT/.NAME.cachet-save-PID-N/` (same parent, so every rename stays on one file system),
//! syncs every file and folder, then swaps it in:
//!
//! 1. files of the target that are not the checkpoint's (a README, a tokenizer, a folder) are
//!    hard-linked (copied where links fail) into `new/`;
//! 2. every folder of `new/` is synced (each file was synced when written);
//! 3. on Linux, `renameat2(RENAME_EXCHANGE)` swaps `new/` and the target in one step; elsewhere,
//!    or where the file system refuses an exchange, the target is renamed to `old/` in the work
//!    folder and `new/` to the target;
//! 4. the parent folder is synced and the work folder, now holding the old checkpoint, removed.
//!
//! What a crash at each point leaves, and what [`recover`] (run by every save first) does:
//!
//! * before the swap: the old checkpoint untouched, a work folder with a partial or complete
//!   `new/`: the work folder is removed;
//! * after the exchange (or after both renames): the new checkpoint, a work folder holding the
//!   old one: the work folder is removed;
//! * between the two renames (no exchange only): no target, the old checkpoint whole in `old/`:
//!   it is renamed back, so the directory is the old checkpoint again.
//!
//! A work folder is left alone while the save that made it runs: each holds `save.lock`, locked
//! for the save's lifetime (the lock dies with the process). The folder of a save that died
//! unlocked is recovered by the next save of the same directory or by
//! [`crate::save::recover_interrupted_save`].

use std::fs::{self, File, TryLockError};
use std::io::{self, Write};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};

use crate::error::{QuantError, Result};

/// The folder of a work folder that holds the checkpoint being written.
const NEW: &str = "new";
/// Where the old checkpoint waits between the two renames of a swap without exchange.
const OLD: &str = "old";
/// The lock file of a work folder, held while its save runs.
const LOCK: &str = "save.lock";
/// Work folders of one save per process and directory are told apart by a counter.
static SEQUENCE: AtomicU64 = AtomicU64::new(0);

fn io_error(op: &'static str, path: &Path) -> impl FnOnce(io::Error) -> QuantError {
    let path = path.to_path_buf();
    move |source| QuantError::Io { op, path, source }
}

/// Test hook (debug builds only): `CACHET_QUANT_TEST_CRASH_AFTER=N` aborts the process at the
/// N-th step of a save, so tests can check what a crash at each point leaves behind.
pub(crate) fn crash_point(what: &str) {
    #[cfg(debug_assertions)]
    {
        static STEPS: AtomicU64 = AtomicU64::new(0);
        if let Some(n) = std::env::var("CACHET_QUANT_TEST_CRASH_AFTER")
            .ok()
            .and_then(|v| v.parse::<u64>().ok())
            && STEPS.fetch_add(1, Ordering::SeqCst) + 1 == n
        {
            eprintln!("CACHET_QUANT_TEST_CRASH_AFTER: aborting after step {n} ({what})");
            std::process::abort();
        }
    }
    #[cfg(not(debug_assertions))]
    let _ = what;
}

/// Test hook (debug builds only): `CACHET_QUANT_TEST_NO_EXCHANGE=1` takes the two-rename swap
/// even where an atomic exchange works.
fn exchange_allowed() -> bool {
    !(cfg!(debug_assertions) && std::env::var_os("CACHET_QUANT_TEST_NO_EXCHANGE").is_some())
}

/// `dir` with symbolic links followed (a dangling last link still gives its target's path), so
/// a link to a checkpoint folder stays a link and the folder it names is replaced.
fn resolve(dir: &Path) -> PathBuf {
    let mut path = dir.to_path_buf();
    for _ in 0..40 {
        match fs::symlink_metadata(&path) {
            Ok(meta) if meta.file_type().is_symlink() => match fs::read_link(&path) {
                Ok(to) if to.is_absolute() => path = to,
                Ok(to) => path = parent_of(&path).join(to),
                Err(_) => break,
            },
            _ => break,
        }
    }
    path
}

fn parent_of(path: &Path) -> PathBuf {
    path.parent()
        .filter(|p| !p.as_os_str().is_empty())
        .unwrap_or(Path::new("."))
        .to_path_buf()
}

/// Syncs a folder's entries (a no-op where folders cannot be opened, i.e. off Unix).
fn sync_dir(dir: &Path) -> Result<()> {
    if cfg!(unix) {
        File::open(dir)
            .and_then(|f| f.sync_all())
            .map_err(io_error("syncing", dir))?;
    }
    Ok(())
}

/// Syncs `dir` and every folder under it.
fn sync_tree(dir: &Path) -> Result<()> {
    for entry in fs::read_dir(dir).map_err(io_error("listing", dir))? {
        let entry = entry.map_err(io_error("listing", dir))?;
        if entry
            .file_type()
            .map_err(io_error("listing", dir))?
            .is_dir()
        {
            sync_tree(&entry.path())?;
        }
    }
    sync_dir(dir)
}

/// Swaps two paths in one step (Linux with glibc: `renameat2(RENAME_EXCHANGE)`); `Ok(false)`
/// where the system or file system cannot.
#[cfg(all(target_os = "linux", target_env = "gnu"))]
fn exchange(a: &Path, b: &Path) -> io::Result<bool> {
    use std::ffi::{CString, c_char, c_int, c_uint};
    use std::os::unix::ffi::OsStrExt;
    unsafe extern "C" {
        fn renameat2(
            olddirfd: c_int,
            oldpath: *const c_char,
            newdirfd: c_int,
            newpath: *const c_char,
            flags: c_uint,
        ) -> c_int;
    }
    // <fcntl.h> and <linux/fs.h>.
    const AT_FDCWD: c_int = -100;
    const RENAME_EXCHANGE: c_uint = 1 << 1;
    // errno values on which to fall back: EINVAL (the file system refuses), ENOSYS (old kernel),
    // EOPNOTSUPP.
    const FALL_BACK: [i32; 3] = [22, 38, 95];
    let c = |p: &Path| {
        CString::new(p.as_os_str().as_bytes())
            .map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, "a NUL byte in the path"))
    };
    let (a, b) = (c(a)?, c(b)?);
    // SAFETY: both pointers are NUL-terminated strings that outlive the call, which only reads
    // them.
    let rc = unsafe { renameat2(AT_FDCWD, a.as_ptr(), AT_FDCWD, b.as_ptr(), RENAME_EXCHANGE) };
    if rc == 0 {
        return Ok(true);
    }
    let err = io::Error::last_os_error();
    match err.raw_os_error() {
        Some(code) if FALL_BACK.contains(&code) => Ok(false),
        _ => Err(err),
    }
}

#[cfg(not(all(target_os = "linux", target_env = "gnu")))]
fn exchange(_a: &Path, _b: &Path) -> io::Result<bool> {
    Ok(false)
}

/// Whether `name` (in `parent`) is a work folder of a save of `target_name`: this crate's
/// `.NAME.cachet-save-PID-N`, or `.NAME.cachet-tmp-PID` of earlier versions.
fn is_work_folder(name: &str, target_name: &str) -> bool {
    let tail = |kind: &str| name.strip_prefix(&format!(".{target_name}.cachet-{kind}-"));
    let numbered = |t: &str, dash: bool| {
        !t.is_empty() && t.chars().all(|c| c.is_ascii_digit() || (dash && c == '-'))
    };
    tail("save").is_some_and(|t| numbered(t, true))
        || tail("tmp").is_some_and(|t| numbered(t, false))
}

/// Puts back the old checkpoint a dead save parked in `work` if the target is missing, then
/// removes `work`.
fn recover_work_folder(work: &Path, target: &Path) -> Result<()> {
    let old = work.join(OLD);
    if fs::symlink_metadata(target).is_err() && old.is_dir() {
        tracing::warn!(
            dir = %target.display(),
            from = %old.display(),
            "an interrupted save left no checkpoint: restoring the old one"
        );
        fs::rename(&old, target).map_err(io_error("restoring", target))?;
        sync_dir(&parent_of(target))?;
    }
    fs::remove_dir_all(work).map_err(io_error("removing", work))
}

/// Recovers what saves of `target` that died left beside it; work folders of running saves are
/// left alone.
fn recover_leftovers(parent: &Path, target: &Path, target_name: &str) -> Result<()> {
    let listing = match fs::read_dir(parent) {
        Ok(l) => l,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(()),
        Err(e) => return Err(io_error("listing", parent)(e)),
    };
    for entry in listing {
        let entry = entry.map_err(io_error("listing", parent))?;
        let name = entry.file_name().to_string_lossy().into_owned();
        if !is_work_folder(&name, target_name) {
            continue;
        }
        let work = entry.path();
        // Held while a save runs: a lock we can take belongs to a dead one.
        let _lock = match File::options().write(true).open(work.join(LOCK)) {
            Ok(file) => match file.try_lock() {
                Ok(()) => Some(file),
                Err(TryLockError::WouldBlock) => continue,
                Err(TryLockError::Error(e)) => {
                    return Err(io_error("locking", &work.join(LOCK))(e));
                }
            },
            Err(_) => None,
        };
        tracing::info!(work = %work.display(), "cleaning up after an interrupted save");
        recover_work_folder(&work, target)?;
    }
    Ok(())
}

/// Recovers the directory `dir` after a save that was killed: see the module docs.
pub(crate) fn recover(dir: &Path) -> Result<()> {
    let target = resolve(dir);
    let Some(name) = target.file_name().map(|n| n.to_string_lossy().into_owned()) else {
        return Ok(());
    };
    recover_leftovers(&parent_of(&target), &target, &name)
}

/// One atomic replacement of a directory: files are written into [`DirSave::staging`], then
/// [`DirSave::commit`] swaps them in. Dropped uncommitted, it leaves the target as it was and
/// nothing behind.
pub(crate) struct DirSave {
    target: PathBuf,
    parent: PathBuf,
    work: PathBuf,
    staging: PathBuf,
    lock: Option<File>,
    done: bool,
}

impl DirSave {
    /// Recovers leftovers of interrupted saves of `dir` and opens a work folder beside it.
    pub(crate) fn begin(dir: &Path) -> Result<Self> {
        let target = resolve(dir);
        if let Ok(meta) = fs::metadata(&target)
            && !meta.is_dir()
        {
            return Err(QuantError::Io {
                op: "saving into",
                path: target,
                source: io::Error::new(
                    io::ErrorKind::NotADirectory,
                    "it exists and is not a directory",
                ),
            });
        }
        let name = target
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .ok_or_else(|| QuantError::Io {
                op: "saving into",
                path: target.clone(),
                source: io::Error::new(io::ErrorKind::InvalidInput, "the path has no final name"),
            })?;
        let parent = parent_of(&target);
        fs::create_dir_all(&parent).map_err(io_error("creating", &parent))?;
        recover_leftovers(&parent, &target, &name)?;
        let n = SEQUENCE.fetch_add(1, Ordering::Relaxed);
        let work = parent.join(format!(".{name}.cachet-save-{}-{n}", std::process::id()));
        fs::create_dir(&work).map_err(io_error("creating", &work))?;
        let mut save = Self {
            staging: work.join(NEW),
            target,
            parent,
            work,
            lock: None,
            done: false,
        };
        let lock_path = save.work.join(LOCK);
        let lock = File::create(&lock_path).map_err(io_error("creating", &lock_path))?;
        lock.lock().map_err(io_error("locking", &lock_path))?;
        save.lock = Some(lock);
        fs::create_dir(&save.staging).map_err(io_error("creating", &save.staging))?;
        Ok(save)
    }

    /// Where the new checkpoint is written (every file synced before [`DirSave::commit`]).
    pub(crate) fn staging(&self) -> &Path {
        &self.staging
    }

    /// Writes and syncs `staging/name`.
    pub(crate) fn write(&self, name: &str, bytes: &[u8]) -> Result<()> {
        let path = self.staging.join(name);
        let mut file = File::create(&path).map_err(io_error("writing", &path))?;
        file.write_all(bytes).map_err(io_error("writing", &path))?;
        file.sync_all().map_err(io_error("syncing", &path))?;
        crash_point("wrote a file");
        Ok(())
    }

    /// Copies `from` to `staging/name` and syncs it.
    pub(crate) fn copy(&self, from: &Path, name: &str) -> Result<()> {
        let to = self.staging.join(name);
        fs::copy(from, &to).map_err(io_error("copying", &to))?;
        File::open(&to)
            .and_then(|f| f.sync_all())
            .map_err(io_error("syncing", &to))?;
        crash_point("copied a file");
        Ok(())
    }

    /// Carries the target's entries that `is_checkpoint_file` does not claim and the new
    /// checkpoint does not replace into the staging folder, then swaps it in (module docs).
    pub(crate) fn commit(mut self, is_checkpoint_file: impl Fn(&str) -> bool) -> Result<()> {
        let exists = fs::symlink_metadata(&self.target).is_ok();
        if exists {
            let meta = fs::metadata(&self.target).map_err(io_error("reading", &self.target))?;
            carry(&self.target, &self.staging, &|name| {
                is_checkpoint_file(name) || self.staging.join(name).exists()
            })?;
            fs::set_permissions(&self.staging, meta.permissions())
                .map_err(io_error("setting permissions of", &self.staging))?;
            crash_point("carried the directory's other files");
        }
        sync_tree(&self.staging)?;
        crash_point("synced the staging folder");
        if !exists {
            fs::rename(&self.staging, &self.target)
                .map_err(io_error("moving into", &self.target))?;
            crash_point("moved the new checkpoint in");
        } else if exchange_allowed()
            && exchange(&self.staging, &self.target)
                .map_err(io_error("swapping in", &self.target))?
        {
            crash_point("exchanged the checkpoints");
        } else {
            let old = self.work.join(OLD);
            fs::rename(&self.target, &old).map_err(io_error("moving aside", &self.target))?;
            crash_point("moved the old checkpoint aside");
            if let Err(e) = fs::rename(&self.staging, &self.target) {
                // Put the old one back (Drop does the same if this fails).
                let _ = fs::rename(&old, &self.target);
                return Err(io_error("moving into", &self.target)(e));
            }
            crash_point("moved the new checkpoint in");
        }
        sync_dir(&self.parent)?;
        crash_point("synced the parent folder");
        self.done = true;
        drop(self.lock.take());
        if let Err(e) = fs::remove_dir_all(&self.work) {
            // The save is complete; the next one removes what is left.
            tracing::warn!(work = %self.work.display(), "could not remove the old checkpoint: {e}");
        }
        crash_point("removed the old checkpoint");
        Ok(())
    }
}

impl Drop for DirSave {
    fn drop(&mut self) {
        if self.done {
            return;
        }
        if let Err(e) = recover_work_folder(&self.work, &self.target) {
            tracing::warn!(work = %self.work.display(), "cleaning up a failed save: {e}");
        }
    }
}

/// Hard-links (or copies) every entry of `from` but those `skip` names into `to`, keeping
/// folders, symbolic links and permissions.
fn carry(from: &Path, to: &Path, skip: &dyn Fn(&str) -> bool) -> Result<()> {
    for entry in fs::read_dir(from).map_err(io_error("listing", from))? {
        let entry = entry.map_err(io_error("listing", from))?;
        let name = entry.file_name();
        if skip(&name.to_string_lossy()) {
            continue;
        }
        carry_entry(&entry.path(), &to.join(&name))?;
    }
    Ok(())
}

fn carry_entry(from: &Path, to: &Path) -> Result<()> {
    let meta = fs::symlink_metadata(from).map_err(io_error("reading", from))?;
    let kind = meta.file_type();
    if kind.is_dir() {
        fs::create_dir(to).map_err(io_error("creating", to))?;
        carry(from, to, &|_| false)?;
        fs::set_permissions(to, meta.permissions()).map_err(io_error("setting permissions of", to))
    } else if kind.is_symlink() {
        let link = fs::read_link(from).map_err(io_error("reading", from))?;
        symlink(&link, to).map_err(io_error("linking", to))
    } else if kind.is_file() {
        if fs::hard_link(from, to).is_err() {
            fs::copy(from, to).map_err(io_error("copying", to))?;
            File::open(to)
                .and_then(|f| f.sync_all())
                .map_err(io_error("syncing", to))?;
        }
        Ok(())
    } else {
        tracing::warn!(path = %from.display(), "not carried over: not a file, folder or link");
        Ok(())
    }
}

#[cfg(unix)]
fn symlink(link: &Path, to: &Path) -> io::Result<()> {
    std::os::unix::fs::symlink(link, to)
}

#[cfg(windows)]
fn symlink(link: &Path, to: &Path) -> io::Result<()> {
    if to
        .parent()
        .map(|p| p.join(link))
        .is_some_and(|t| t.is_dir())
    {
        std::os::windows::fs::symlink_dir(link, to)
    } else {
        std::os::windows::fs::symlink_file(link, to)
    }
}

#[cfg(not(any(unix, windows)))]
fn symlink(_link: &Path, _to: &Path) -> io::Result<()> {
    Err(io::Error::new(
        io::ErrorKind::Unsupported,
        "symbolic links are not supported here",
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn work_folders_are_told_apart_from_other_siblings() {
        assert!(is_work_folder(".out.cachet-save-123-0", "out"));
        assert!(is_work_folder(".out.cachet-tmp-123", "out"));
        assert!(!is_work_folder(".out.cachet-tmp-1.cachet-tmp-2", "out"));
        assert!(!is_work_folder(".out.cachet-save-", "out"));
        assert!(!is_work_folder(".out.cachet-save-1-0", "ou"));
        assert!(!is_work_folder("out", "out"));
    }

    #[test]
    fn a_failed_save_restores_a_parked_checkpoint() {
        let tmp = tempfile::tempdir().unwrap();
        let target = tmp.path().join("ckpt");
        fs::create_dir(&target).unwrap();
        fs::write(target.join("config.json"), b"old").unwrap();
        let save = DirSave::begin(&target).unwrap();
        save.write("config.json", b"new").unwrap();
        // Dropped after parking the old checkpoint (a failed second rename).
        fs::rename(&target, save.work.join(OLD)).unwrap();
        drop(save);
        assert_eq!(fs::read(target.join("config.json")).unwrap(), b"old");
        assert_eq!(fs::read_dir(tmp.path()).unwrap().count(), 1);
    }

    #[cfg(unix)]
    #[test]
    fn a_symlinked_directory_stays_a_link() {
        let tmp = tempfile::tempdir().unwrap();
        let real = tmp.path().join("real");
        fs::create_dir(&real).unwrap();
        fs::write(real.join("notes.txt"), b"mine").unwrap();
        let link = tmp.path().join("link");
        std::os::unix::fs::symlink("real", &link).unwrap();
        let save = DirSave::begin(&link).unwrap();
        save.write("config.json", b"{}").unwrap();
        save.commit(|_| false).unwrap();
        assert!(
            fs::symlink_metadata(&link)
                .unwrap()
                .file_type()
                .is_symlink()
        );
        assert_eq!(fs::read(real.join("config.json")).unwrap(), b"{}");
        assert_eq!(fs::read(real.join("notes.txt")).unwrap(), b"mine");
    }
}
