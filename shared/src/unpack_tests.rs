//! Hostile archives, generated at test time (no binary fixture is committed): each must fail
//! with its own error, write nothing outside the destination and leave no partial destination.

#![allow(clippy::unwrap_used, clippy::expect_used)] // tests may unwrap

use std::io::Write;

use super::*;

/// How a tar entry is written.
enum T<'a> {
    File(&'a [u8], &'a [u8], u32),
    Dir(&'a [u8]),
    Symlink(&'a [u8], &'a [u8]),
    Hardlink(&'a [u8], &'a [u8]),
    Char(&'a [u8]),
    Zeros(&'a [u8], u64),
}

/// A raw name, written byte for byte (the tar crate's own `set_path` would refuse `..`).
fn raw_header(name: &[u8], kind: tar::EntryType, size: u64, mode: u32) -> tar::Header {
    let mut h = tar::Header::new_gnu();
    h.set_entry_type(kind);
    h.set_size(size);
    h.set_mode(mode);
    h.set_mtime(0);
    h.as_old_mut().name[..name.len()].copy_from_slice(name);
    h.set_cksum();
    h
}

fn tar_gz(entries: &[T<'_>]) -> Vec<u8> {
    use tar::EntryType as E;
    let gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::default());
    let mut b = tar::Builder::new(gz);
    for e in entries {
        match e {
            T::File(name, data, mode) => {
                let h = raw_header(name, E::Regular, data.len() as u64, *mode);
                b.append(&h, *data).unwrap();
            }
            T::Dir(name) => b
                .append(&raw_header(name, E::Directory, 0, 0o755), &[][..])
                .unwrap(),
            T::Symlink(name, target) | T::Hardlink(name, target) => {
                let kind = if matches!(e, T::Symlink(..)) {
                    E::Symlink
                } else {
                    E::Link
                };
                let mut h = raw_header(name, kind, 0, 0o777);
                h.set_link_name(std::str::from_utf8(target).unwrap())
                    .unwrap();
                h.set_cksum();
                b.append(&h, &[][..]).unwrap();
            }
            T::Char(name) => b
                .append(&raw_header(name, E::Char, 0, 0o666), &[][..])
                .unwrap(),
            T::Zeros(name, len) => {
                let h = raw_header(name, E::Regular, *len, 0o644);
                b.append(&h, std::io::repeat(0).take(*len)).unwrap();
            }
        }
    }
    b.into_inner().unwrap().finish().unwrap()
}

fn zip_of(build: impl FnOnce(&mut zip::ZipWriter<std::io::Cursor<Vec<u8>>>)) -> Vec<u8> {
    let mut w = zip::ZipWriter::new(std::io::Cursor::new(Vec::new()));
    build(&mut w);
    w.finish().unwrap().into_inner()
}

fn opts() -> zip::write::SimpleFileOptions {
    zip::write::SimpleFileOptions::default()
}

struct Case {
    _tmp: tempfile::TempDir,
    root: PathBuf,
    archive: PathBuf,
    dest: PathBuf,
}

fn case(bytes: &[u8]) -> Case {
    let tmp = tempfile::tempdir().unwrap();
    // The destination is deep enough that `..` from it lands in `root`, which is watched.
    let root = tmp.path().join("root");
    let dest = root.join("a/b/dest");
    fs::create_dir_all(dest.parent().unwrap()).unwrap();
    let archive = tmp.path().join("archive.bin");
    fs::write(&archive, bytes).unwrap();
    Case {
        _tmp: tmp,
        root,
        archive,
        dest,
    }
}

/// Every path below `dir`, relative, sorted.
fn tree(dir: &Path) -> Vec<String> {
    let mut out = Vec::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        for e in fs::read_dir(&d).unwrap() {
            let p = e.unwrap().path();
            out.push(p.strip_prefix(dir).unwrap().display().to_string());
            if fs::symlink_metadata(&p).unwrap().is_dir() {
                stack.push(p);
            }
        }
    }
    out.sort();
    out
}

/// Fails with an error whose text holds `needle`, and leaves exactly `a`, `a/b` under root.
fn refused(bytes: &[u8], limits: &Limits, needle: &str) {
    let c = case(bytes);
    let err = unpack(&c.archive, &c.dest, limits).unwrap_err().to_string();
    assert!(err.contains(needle), "{needle:?} not in {err:?}");
    assert_eq!(tree(&c.root), vec!["a", "a/b"], "left behind after {err}");
    assert!(!Path::new("/tmp/tether-unpack-escape").exists());
}

#[test]
fn a_good_archive_extracts_exactly_and_strips_setuid() {
    let bytes = tar_gz(&[
        T::Dir(b"bin/"),
        T::File(b"bin/run", b"#!/bin/sh\necho hi\n", 0o4755),
        T::File(b"./conf/app.toml", b"x = 1\n", 0o640),
    ]);
    let c = case(&bytes);
    let done = unpack(&c.archive, &c.dest, &Limits::default()).unwrap();
    assert_eq!(done.files, 2);
    assert_eq!(
        tree(&c.dest),
        vec!["bin", "bin/run", "conf", "conf/app.toml"]
    );
    let mode = fs::metadata(c.dest.join("bin/run"))
        .unwrap()
        .permissions()
        .mode();
    assert_eq!(mode & 0o7777, 0o755, "setuid must be stripped");
    assert_eq!(fs::read(c.dest.join("conf/app.toml")).unwrap(), b"x = 1\n");
    // A second extraction replaces the first whole.
    let again = tar_gz(&[T::File(b"only", b"1", 0o644)]);
    fs::write(&c.archive, again).unwrap();
    unpack(&c.archive, &c.dest, &Limits::default()).unwrap();
    assert_eq!(tree(&c.dest), vec!["only"]);
    assert_eq!(tree(&c.root), vec!["a", "a/b", "a/b/dest", "a/b/dest/only"]);

    let z = zip_of(|w| {
        w.add_directory("d/", opts()).unwrap();
        w.start_file("d/f.txt", opts().unix_permissions(0o6755))
            .unwrap();
        w.write_all(b"zipped").unwrap();
    });
    let c = case(&z);
    unpack(&c.archive, &c.dest, &Limits::default()).unwrap();
    assert_eq!(tree(&c.dest), vec!["d", "d/f.txt"]);
    assert_eq!(fs::read(c.dest.join("d/f.txt")).unwrap(), b"zipped");
    let mode = fs::metadata(c.dest.join("d/f.txt"))
        .unwrap()
        .permissions()
        .mode();
    assert_eq!(mode & 0o7000, 0);
}

#[test]
fn traversal_and_absolute_paths_are_refused() {
    let l = Limits::default();
    refused(
        &tar_gz(&[T::File(b"ok", b"1", 0o644), T::File(b"../x", b"pwn", 0o644)]),
        &l,
        "'..'",
    );
    refused(
        &tar_gz(&[T::File(b"/tmp/tether-unpack-escape", b"pwn", 0o644)]),
        &l,
        "absolute",
    );
    refused(&tar_gz(&[T::File(b"C:\\x", b"pwn", 0o644)]), &l, "unsafe");
    refused(
        &tar_gz(&[T::File(b"d/..\\..\\x", b"p", 0o644)]),
        &l,
        "backslash",
    );
    let z = zip_of(|w| {
        w.start_file("ok", opts()).unwrap();
        w.write_all(b"1").unwrap();
        w.start_file("../../x", opts()).unwrap();
        w.write_all(b"pwn").unwrap();
    });
    refused(&z, &l, "'..'");
    let z = zip_of(|w| {
        w.start_file("/tmp/tether-unpack-escape", opts()).unwrap();
        w.write_all(b"pwn").unwrap();
    });
    refused(&z, &l, "absolute");
    assert!(safe_relative(b"a\0b").is_err());
    assert!(safe_relative(b"./").is_err());
    assert_eq!(safe_relative(b"./a//b/").unwrap(), PathBuf::from("a/b"));
}

#[test]
fn links_devices_and_duplicates_are_refused() {
    let l = Limits::default();
    // tar: symlink `x -> ..`, then `x/foo` (RUSTSEC-2021-0080).
    refused(
        &tar_gz(&[T::Symlink(b"x", b".."), T::File(b"x/foo", b"pwn", 0o644)]),
        &l,
        "symbolic link",
    );
    refused(
        &tar_gz(&[T::Hardlink(b"h", b"/etc/passwd")]),
        &l,
        "hard link",
    );
    refused(&tar_gz(&[T::Char(b"null")]), &l, "character device");
    refused(
        &tar_gz(&[T::File(b"d", b"1", 0o644), T::File(b"d", b"2", 0o644)]),
        &l,
        "duplicate",
    );
    refused(
        &tar_gz(&[T::File(b"d", b"1", 0o644), T::File(b"d/e", b"2", 0o644)]),
        &l,
        "duplicate",
    );
    // zip: a symlink entry, then a file through it (CVE-2025-29787).
    let z = zip_of(|w| {
        w.add_symlink("link", "..", opts()).unwrap();
        w.start_file("link/escape", opts()).unwrap();
        w.write_all(b"pwn").unwrap();
    });
    refused(&z, &l, "symbolic link");
}

#[test]
fn entry_count_and_expanded_size_are_capped() {
    let many: Vec<Vec<u8>> = (0..50).map(|i| format!("f{i}").into_bytes()).collect();
    let entries: Vec<T<'_>> = many.iter().map(|n| T::File(n, b"x", 0o644)).collect();
    let small = Limits {
        max_entries: 10,
        ..Limits::default()
    };
    refused(&tar_gz(&entries), &small, "more than 10 entries");
    let z = zip_of(|w| {
        for i in 0..50 {
            w.start_file(format!("f{i}"), opts()).unwrap();
        }
    });
    refused(&z, &small, "more than 10 entries");
    // 64 MiB of zeros compress to well under 1 MiB: over the default ratio cap.
    let bomb = tar_gz(&[T::Zeros(b"zeros", 64 * 1024 * 1024)]);
    assert!(bomb.len() < 1024 * 1024, "{}", bomb.len());
    refused(&bomb, &Limits::default(), "compression bomb");
    let capped = Limits {
        max_total_bytes: 1000,
        ..Limits::default()
    };
    refused(
        &tar_gz(&[T::Zeros(b"z", 1001)]),
        &capped,
        "more than 1000 bytes",
    );
    refused(b"plain text", &Limits::default(), "not a .tar.gz or .zip");
}

#[test]
fn a_destination_that_is_a_link_is_refused() {
    let c = case(&tar_gz(&[T::File(b"f", b"1", 0o644)]));
    let elsewhere = c.root.join("elsewhere");
    fs::create_dir(&elsewhere).unwrap();
    std::os::unix::fs::symlink(&elsewhere, &c.dest).unwrap();
    let err = unpack(&c.archive, &c.dest, &Limits::default()).unwrap_err();
    assert!(err.to_string().contains("symbolic link"), "{err}");
    assert!(tree(&elsewhere).is_empty());
}

#[test]
fn an_archive_made_by_gnu_tar_from_a_directory_extracts() {
    // `tar -czf site.tar.gz -C site .`: entries `./`, `./index.html`, `./css/`, `./css/a.css`.
    let tmp = tempfile::tempdir().unwrap();
    let site = tmp.path().join("site");
    fs::create_dir_all(site.join("css")).unwrap();
    fs::write(site.join("index.html"), "<h1>hi</h1>").unwrap();
    fs::write(site.join("css/a.css"), "h1{}").unwrap();
    let archive = tmp.path().join("site.tar.gz");
    let status = std::process::Command::new("tar")
        .arg("-czf")
        .arg(&archive)
        .arg("-C")
        .arg(&site)
        .arg(".")
        .status()
        .unwrap();
    assert!(status.success());
    let listing = std::process::Command::new("tar")
        .arg("-tzf")
        .arg(&archive)
        .output()
        .unwrap();
    let names = String::from_utf8(listing.stdout).unwrap();
    assert!(
        names.lines().any(|l| l == "./"),
        "GNU tar writes ./ first: {names}"
    );
    let dest = tmp.path().join("out/site");
    let done = unpack(&archive, &dest, &Limits::default()).unwrap();
    assert_eq!(done.files, 2);
    assert_eq!(tree(&dest), ["css", "css/a.css", "index.html"]);
    assert_eq!(
        fs::read_to_string(dest.join("index.html")).unwrap(),
        "<h1>hi</h1>"
    );
    // `./` is fine for a directory entry only: a file named `./` is still refused, as are
    // `..` and absolute paths behind a `./`.
    refused(
        &tar_gz(&[T::File(b"./", b"x", 0o644)]),
        &Limits::default(),
        "empty path",
    );
    refused(&tar_gz(&[T::Dir(b"./../")]), &Limits::default(), "'..'");
    refused(
        &tar_gz(&[T::File(b"./../x", b"x", 0o644)]),
        &Limits::default(),
        "'..'",
    );
    refused(&tar_gz(&[T::Dir(b"")]), &Limits::default(), "empty path");
}
