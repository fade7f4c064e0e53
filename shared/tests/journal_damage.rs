//! A damaged journal never panics and never starts silently empty: opening it either recovers a
//! verified prefix of what was written (same incarnation) or fails with an error that names the
//! documented way out. Each case damages a copy of one populated journal.

#![allow(clippy::unwrap_used, clippy::expect_used)] // tests may unwrap

use std::path::{Path, PathBuf};

use tether_shared::journal::{Journal, JournalError, JournalOptions, LogName, Op};
use tether_shared::protocol::Seq;

const RECORDS: u64 = 300;

fn copy_dir(from: &Path, to: &Path) {
    std::fs::create_dir_all(to).unwrap();
    for entry in std::fs::read_dir(from).unwrap() {
        let entry = entry.unwrap();
        let target = to.join(entry.file_name());
        if entry.file_type().unwrap().is_dir() {
            copy_dir(&entry.path(), &target);
        } else {
            std::fs::copy(entry.path(), target).unwrap();
        }
    }
}

fn populate(dir: &Path) -> String {
    let system = actix::System::new();
    system.block_on(async {
        let (journal, _) = Journal::open(dir, &JournalOptions::default()).unwrap();
        let h = journal.handle();
        let log = LogName::new("in/events/a").unwrap();
        for seq in 1..=RECORDS {
            let payload = format!("record {seq} {}", "x".repeat((seq % 700) as usize)).into_bytes();
            h.commit(vec![Op::Append {
                log: log.clone(),
                seq: Seq(seq),
                payload,
            }])
            .await
            .unwrap();
        }
        h.incarnation().to_owned()
    })
}

fn damage(dir: &Path, case: &str) {
    let db = tether_shared::journal::generation::data_file(dir).unwrap();
    let len = std::fs::metadata(&db).unwrap().len();
    match case {
        "truncate-1" => std::fs::OpenOptions::new()
            .write(true)
            .open(&db)
            .unwrap()
            .set_len(len - 1)
            .unwrap(),
        "truncate-4096" => std::fs::OpenOptions::new()
            .write(true)
            .open(&db)
            .unwrap()
            .set_len(len.saturating_sub(4096))
            .unwrap(),
        "truncate-half" => std::fs::OpenOptions::new()
            .write(true)
            .open(&db)
            .unwrap()
            .set_len(len / 2)
            .unwrap(),
        "flip-bits" => {
            let mut bytes = std::fs::read(&db).unwrap();
            for i in (64..bytes.len()).step_by(997) {
                bytes[i] ^= 0x5A;
            }
            std::fs::write(&db, bytes).unwrap();
        }
        "zero-block" => {
            let mut bytes = std::fs::read(&db).unwrap();
            let start = (bytes.len() / 2) & !4095;
            let end = (start + 4096).min(bytes.len());
            bytes[start..end].fill(0);
            std::fs::write(&db, bytes).unwrap();
        }
        "delete-db" => std::fs::remove_file(&db).unwrap(),
        "delete-conf" => std::fs::remove_file(db.with_file_name("conf")).unwrap(),
        "garbage-conf" => {
            std::fs::write(db.with_file_name("conf"), b"\x00\xffnot a config\n").unwrap()
        }
        "delete-current" => std::fs::remove_file(dir.join("CURRENT")).unwrap(),
        "garbage-current" => std::fs::write(dir.join("CURRENT"), b"../../etc\n").unwrap(),
        "current-elsewhere" => std::fs::write(dir.join("CURRENT"), b"sled.7\n").unwrap(),
        "delete-marker" => std::fs::remove_file(dir.join("INCARNATION")).unwrap(),
        "other-marker" => std::fs::write(dir.join("INCARNATION"), b"0123456789abcdef").unwrap(),
        other => panic!("unknown case {other}"),
    }
}

#[test]
fn damaged_journals_fail_clearly_or_recover_a_verified_prefix() {
    let tmp = tempfile::tempdir().unwrap();
    let original = tmp.path().join("original");
    let incarnation = populate(&original);
    let cases = [
        "truncate-1",
        "truncate-4096",
        "truncate-half",
        "flip-bits",
        "zero-block",
        "delete-db",
        "delete-conf",
        "garbage-conf",
        "delete-marker",
        "other-marker",
        "delete-current",
        "garbage-current",
        "current-elsewhere",
    ];
    let mut refused = Vec::new();
    for case in cases {
        let dir: PathBuf = tmp.path().join(case);
        copy_dir(&original, &dir);
        damage(&dir, case);
        let opened = std::panic::catch_unwind(|| Journal::open(&dir, &JournalOptions::default()));
        match opened {
            Err(_) => panic!("{case}: opening panicked"),
            Ok(Err(e)) => {
                let text = e.to_string();
                assert!(
                    matches!(e, JournalError::Open { .. } | JournalError::Corrupt { .. }),
                    "{case}: {text}"
                );
                assert!(
                    text.contains("docs/durability.md")
                        && text.contains("move the directory aside"),
                    "{case}: {text}"
                );
                refused.push(case);
            }
            Ok(Ok((journal, recovered))) => {
                assert_eq!(
                    recovered.incarnation, incarnation,
                    "{case}: opened as another journal"
                );
                assert!(!recovered.created, "{case}: started empty");
                let held = journal
                    .handle()
                    .read_log(&LogName::new("in/events/a").unwrap(), Seq::ZERO, usize::MAX)
                    .unwrap();
                let seqs: Vec<u64> = held.iter().map(|r| r.seq.0).collect();
                assert_eq!(
                    seqs,
                    (1..=seqs.len() as u64).collect::<Vec<_>>(),
                    "{case}: not a prefix"
                );
                for r in &held {
                    assert!(
                        r.payload
                            .starts_with(format!("record {} ", r.seq.0).as_bytes()),
                        "{case}: wrong content at {}",
                        r.seq
                    );
                }
                eprintln!("{case}: recovered {} of {RECORDS} records", held.len());
            }
        }
    }
    // The cases that remove or swap what the journal is must be refused, whatever sled does.
    for must in [
        "delete-db",
        "other-marker",
        "delete-current",
        "garbage-current",
        "current-elsewhere",
    ] {
        assert!(
            refused.contains(&must),
            "{must} was not refused (refused: {refused:?})"
        );
    }
    // An intact journal whose marker is lost just gets the marker back.
    assert!(!refused.contains(&"delete-marker"));
    assert!(tmp.path().join("delete-marker/INCARNATION").exists());
}
