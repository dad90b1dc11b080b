//! A disk that loses what was not fsynced, for the power-loss tests
//! (`powerloss`, and PostgreSQL's in `pg_outage`).
//!
//! `kill -9` cannot test durability: the page cache survives a killed
//! process, so a store that never fsyncs would pass. Here the gateway's
//! data directory is on a small FUSE file system kept in this test's
//! memory (`VolatileDisk`) that models a disk with a volatile write cache:
//!
//! - file contents written are served back at once, but become durable
//!   only when the file is fsynced (`fsync` or `fdatasync`);
//! - directory entries (create, rename, unlink) are durable at once (a
//!   journalling file system's metadata; SQLite fsyncs what it relies on);
//! - "pulling the plug" unmounts the file system (dropping the kernel's
//!   page cache for it) and sets every file back to its last synced
//!   content, then mounts it again.
//!
//! Why FUSE and not `dm-flakey`/`dm-log-writes` on a loop device: FUSE is
//! in every kernel this project's machines run, needs no device-mapper
//! targets, and discards exactly the unsynced writes of each file, which
//! is the promise under test (SQLite's `synchronous=FULL`).

use std::collections::{BTreeMap, HashMap};
use std::ffi::{OsStr, OsString};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, SystemTime};

use fuser::{
    Errno, FileAttr, FileHandle, FileType, Filesystem, FopenFlags, Generation, INodeNo, LockOwner,
    MountOption, OpenFlags, RenameFlags, ReplyAttr, ReplyCreate, ReplyData, ReplyDirectory,
    ReplyEmpty, ReplyEntry, ReplyOpen, ReplyStatfs, ReplyWrite, Request, TimeOrNow, WriteFlags,
};

#[derive(Debug)]
struct Node {
    dir: bool,
    perm: u16,
    uid: u32,
    gid: u32,
    /// What reads see.
    data: Vec<u8>,
    /// What survives a power loss: `data` as of the last fsync.
    durable: Vec<u8>,
    children: BTreeMap<OsString, u64>,
    mtime: SystemTime,
}

impl Node {
    fn new(dir: bool, perm: u16, uid: u32, gid: u32) -> Node {
        Node {
            dir,
            perm,
            uid,
            gid,
            data: Vec::new(),
            durable: Vec::new(),
            children: BTreeMap::new(),
            mtime: SystemTime::now(),
        }
    }
}

/// The disk's contents, shared by the mounted file system and the test.
#[derive(Debug)]
pub struct Disk {
    nodes: HashMap<u64, Node>,
    next: u64,
    /// fsync calls served.
    pub syncs: u64,
    /// Bytes of file content the disk holds at most (`ENOSPC` beyond).
    pub capacity: Option<usize>,
}

impl Disk {
    fn new() -> Disk {
        let mut nodes = HashMap::new();
        nodes.insert(1, Node::new(true, 0o755, 0, 0));
        Disk {
            nodes,
            next: 2,
            syncs: 0,
            capacity: None,
        }
    }

    fn attr(&self, ino: u64) -> Option<FileAttr> {
        let n = self.nodes.get(&ino)?;
        let size = if n.dir { 0 } else { n.data.len() as u64 };
        Some(FileAttr {
            ino: INodeNo(ino),
            size,
            blocks: size.div_ceil(512),
            atime: n.mtime,
            mtime: n.mtime,
            ctime: n.mtime,
            crtime: n.mtime,
            kind: if n.dir {
                FileType::Directory
            } else {
                FileType::RegularFile
            },
            perm: n.perm,
            nlink: if n.dir { 2 } else { 1 },
            uid: n.uid,
            gid: n.gid,
            rdev: 0,
            flags: 0,
            blksize: 4096,
        })
    }

    /// Bytes of file content held now.
    fn used(&self) -> usize {
        self.nodes.values().map(|n| n.data.len()).sum()
    }

    /// Every file back to its last synced content; returns how many files
    /// lost writes.
    fn lose_unsynced(&mut self) -> usize {
        let mut lost = 0;
        for n in self.nodes.values_mut().filter(|n| !n.dir) {
            if n.data != n.durable {
                n.data = n.durable.clone();
                lost += 1;
            }
        }
        lost
    }
}

/// The FUSE face of a [`Disk`].
struct VolatileFs(Arc<Mutex<Disk>>);

const TTL: Duration = Duration::ZERO;

impl VolatileFs {
    fn disk(&self) -> MutexGuard<'_, Disk> {
        self.0.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn add(
        &self,
        req: &Request,
        parent: u64,
        name: &OsStr,
        dir: bool,
        mode: u32,
    ) -> Result<FileAttr, Errno> {
        let mut disk = self.disk();
        let ino = disk.next;
        match disk.nodes.get_mut(&parent) {
            Some(p) if p.dir => {
                if p.children.contains_key(name) {
                    return Err(Errno::EEXIST);
                }
                p.children.insert(name.to_owned(), ino);
            }
            _ => return Err(Errno::ENOENT),
        }
        disk.next += 1;
        disk.nodes.insert(
            ino,
            Node::new(dir, (mode & 0o7777) as u16, req.uid(), req.gid()),
        );
        disk.attr(ino).ok_or(Errno::EIO)
    }

    fn remove(&self, parent: u64, name: &OsStr) -> Result<(), Errno> {
        let mut disk = self.disk();
        let ino = disk
            .nodes
            .get_mut(&parent)
            .and_then(|p| p.children.remove(name))
            .ok_or(Errno::ENOENT)?;
        disk.nodes.remove(&ino);
        Ok(())
    }
}

impl Filesystem for VolatileFs {
    fn lookup(&self, _req: &Request, parent: INodeNo, name: &OsStr, reply: ReplyEntry) {
        let disk = self.disk();
        let found = disk
            .nodes
            .get(&u64::from(parent))
            .and_then(|p| p.children.get(name))
            .and_then(|ino| disk.attr(*ino));
        match found {
            Some(attr) => reply.entry(&TTL, &attr, Generation(0)),
            None => reply.error(Errno::ENOENT),
        }
    }

    fn getattr(&self, _req: &Request, ino: INodeNo, _fh: Option<FileHandle>, reply: ReplyAttr) {
        match self.disk().attr(u64::from(ino)) {
            Some(attr) => reply.attr(&TTL, &attr),
            None => reply.error(Errno::ENOENT),
        }
    }

    fn setattr(
        &self,
        _req: &Request,
        ino: INodeNo,
        mode: Option<u32>,
        uid: Option<u32>,
        gid: Option<u32>,
        size: Option<u64>,
        _atime: Option<TimeOrNow>,
        _mtime: Option<TimeOrNow>,
        _ctime: Option<SystemTime>,
        _fh: Option<FileHandle>,
        _crtime: Option<SystemTime>,
        _chgtime: Option<SystemTime>,
        _bkuptime: Option<SystemTime>,
        _flags: Option<fuser::BsdFileFlags>,
        reply: ReplyAttr,
    ) {
        let mut disk = self.disk();
        let ino = u64::from(ino);
        let Some(n) = disk.nodes.get_mut(&ino) else {
            reply.error(Errno::ENOENT);
            return;
        };
        if let Some(mode) = mode {
            n.perm = (mode & 0o7777) as u16;
        }
        if let Some(uid) = uid {
            n.uid = uid;
        }
        if let Some(gid) = gid {
            n.gid = gid;
        }
        if let Some(size) = size {
            // A truncation is a content change: durable only when synced.
            n.data.resize(size as usize, 0);
            n.mtime = SystemTime::now();
        }
        match disk.attr(ino) {
            Some(attr) => reply.attr(&TTL, &attr),
            None => reply.error(Errno::ENOENT),
        }
    }

    fn mkdir(
        &self,
        req: &Request,
        parent: INodeNo,
        name: &OsStr,
        mode: u32,
        _umask: u32,
        reply: ReplyEntry,
    ) {
        match self.add(req, u64::from(parent), name, true, mode) {
            Ok(attr) => reply.entry(&TTL, &attr, Generation(0)),
            Err(e) => reply.error(e),
        }
    }

    fn unlink(&self, _req: &Request, parent: INodeNo, name: &OsStr, reply: ReplyEmpty) {
        match self.remove(u64::from(parent), name) {
            Ok(()) => reply.ok(),
            Err(e) => reply.error(e),
        }
    }

    fn rmdir(&self, _req: &Request, parent: INodeNo, name: &OsStr, reply: ReplyEmpty) {
        match self.remove(u64::from(parent), name) {
            Ok(()) => reply.ok(),
            Err(e) => reply.error(e),
        }
    }

    fn rename(
        &self,
        _req: &Request,
        parent: INodeNo,
        name: &OsStr,
        newparent: INodeNo,
        newname: &OsStr,
        _flags: RenameFlags,
        reply: ReplyEmpty,
    ) {
        let mut disk = self.disk();
        let Some(ino) = disk
            .nodes
            .get_mut(&u64::from(parent))
            .and_then(|p| p.children.remove(name))
        else {
            reply.error(Errno::ENOENT);
            return;
        };
        let replaced = disk
            .nodes
            .get_mut(&u64::from(newparent))
            .and_then(|p| p.children.insert(newname.to_owned(), ino));
        if let Some(old) = replaced {
            disk.nodes.remove(&old);
        }
        reply.ok();
    }

    fn open(&self, _req: &Request, _ino: INodeNo, _flags: OpenFlags, reply: ReplyOpen) {
        reply.opened(FileHandle(0), FopenFlags::empty());
    }

    fn read(
        &self,
        _req: &Request,
        ino: INodeNo,
        _fh: FileHandle,
        offset: u64,
        size: u32,
        _flags: OpenFlags,
        _lock_owner: Option<LockOwner>,
        reply: ReplyData,
    ) {
        let disk = self.disk();
        let Some(n) = disk.nodes.get(&u64::from(ino)) else {
            reply.error(Errno::ENOENT);
            return;
        };
        let start = (offset as usize).min(n.data.len());
        let end = (start + size as usize).min(n.data.len());
        reply.data(&n.data[start..end]);
    }

    fn write(
        &self,
        _req: &Request,
        ino: INodeNo,
        _fh: FileHandle,
        offset: u64,
        data: &[u8],
        _write_flags: WriteFlags,
        _flags: OpenFlags,
        _lock_owner: Option<LockOwner>,
        reply: ReplyWrite,
    ) {
        let mut disk = self.disk();
        let end = offset as usize + data.len();
        let grows = disk
            .nodes
            .get(&u64::from(ino))
            .map_or(0, |n| end.saturating_sub(n.data.len()));
        if grows > 0 && disk.capacity.is_some_and(|c| disk.used() + grows > c) {
            reply.error(Errno::ENOSPC);
            return;
        }
        let Some(n) = disk.nodes.get_mut(&u64::from(ino)) else {
            reply.error(Errno::ENOENT);
            return;
        };
        if n.data.len() < end {
            n.data.resize(end, 0);
        }
        n.data[offset as usize..end].copy_from_slice(data);
        n.mtime = SystemTime::now();
        reply.written(data.len() as u32);
    }

    fn flush(
        &self,
        _req: &Request,
        _ino: INodeNo,
        _fh: FileHandle,
        _lock_owner: LockOwner,
        reply: ReplyEmpty,
    ) {
        // close() is not a sync.
        reply.ok();
    }

    fn fsync(
        &self,
        _req: &Request,
        ino: INodeNo,
        _fh: FileHandle,
        _datasync: bool,
        reply: ReplyEmpty,
    ) {
        let mut disk = self.disk();
        disk.syncs += 1;
        if let Some(n) = disk.nodes.get_mut(&u64::from(ino)) {
            n.durable = n.data.clone();
        }
        reply.ok();
    }

    fn readdir(
        &self,
        _req: &Request,
        ino: INodeNo,
        _fh: FileHandle,
        offset: u64,
        mut reply: ReplyDirectory,
    ) {
        let disk = self.disk();
        let Some(dir) = disk.nodes.get(&u64::from(ino)) else {
            reply.error(Errno::ENOENT);
            return;
        };
        let mut entries = vec![
            (u64::from(ino), FileType::Directory, OsString::from(".")),
            (1, FileType::Directory, OsString::from("..")),
        ];
        for (name, child) in &dir.children {
            let kind = match disk.nodes.get(child) {
                Some(n) if n.dir => FileType::Directory,
                _ => FileType::RegularFile,
            };
            entries.push((*child, kind, name.clone()));
        }
        for (i, (child, kind, name)) in entries.into_iter().enumerate().skip(offset as usize) {
            if reply.add(INodeNo(child), (i + 1) as u64, kind, &name) {
                break;
            }
        }
        reply.ok();
    }

    fn fsyncdir(
        &self,
        _req: &Request,
        _ino: INodeNo,
        _fh: FileHandle,
        _datasync: bool,
        reply: ReplyEmpty,
    ) {
        reply.ok();
    }

    fn statfs(&self, _req: &Request, _ino: INodeNo, reply: ReplyStatfs) {
        reply.statfs(1 << 24, 1 << 23, 1 << 23, 1 << 20, 1 << 19, 4096, 255, 4096);
    }

    fn create(
        &self,
        req: &Request,
        parent: INodeNo,
        name: &OsStr,
        mode: u32,
        _umask: u32,
        _flags: i32,
        reply: ReplyCreate,
    ) {
        match self.add(req, u64::from(parent), name, false, mode) {
            Ok(attr) => reply.created(
                &TTL,
                &attr,
                Generation(0),
                FileHandle(0),
                FopenFlags::empty(),
            ),
            Err(e) => reply.error(e),
        }
    }
}

/// A [`Disk`] mounted at a directory, with a plug to pull.
pub struct VolatileMount {
    disk: Arc<Mutex<Disk>>,
    path: PathBuf,
    session: Option<fuser::BackgroundSession>,
}

impl VolatileMount {
    /// Mounts an empty disk at `path` (created if missing).
    pub fn new(path: &Path) -> std::io::Result<VolatileMount> {
        std::fs::create_dir_all(path)?;
        let mut mount = VolatileMount {
            disk: Arc::new(Mutex::new(Disk::new())),
            path: path.to_owned(),
            session: None,
        };
        mount.mount()?;
        Ok(mount)
    }

    fn mount(&mut self) -> std::io::Result<()> {
        let mut cfg = fuser::Config::default();
        // Other users (PostgreSQL's `postgres`) may use it too.
        cfg.mount_options = vec![MountOption::FSName("credgate-volatile".into())];
        cfg.acl = fuser::SessionACL::All;
        let fs = VolatileFs(self.disk.clone());
        self.session = Some(fuser::spawn_mount(fs, &self.path, &cfg)?);
        Ok(())
    }

    /// Power cut and back: unmount (every process using it must be dead),
    /// lose what was not synced, mount again. Returns how many files lost
    /// writes.
    pub fn pull_the_plug(&mut self) -> std::io::Result<usize> {
        if let Some(s) = self.session.take() {
            s.umount_and_join()?;
        }
        let lost = self
            .disk
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .lose_unsynced();
        self.mount()?;
        Ok(lost)
    }

    /// Limits the disk to what it holds now plus `spare` bytes (`None`:
    /// no limit).
    #[allow(dead_code)] // the PostgreSQL suite does not fill its disk
    pub fn fill_up(&self, spare: Option<usize>) {
        let mut disk = self.disk.lock().unwrap_or_else(|e| e.into_inner());
        disk.capacity = spare.map(|s| disk.used() + s);
    }

    /// fsyncs served so far.
    pub fn syncs(&self) -> u64 {
        self.disk.lock().unwrap_or_else(|e| e.into_inner()).syncs
    }
}
