//! Debug aid: print a journal's logs (first/last seq) and selected meta values.
//! `cargo run -p tether-shared --example journal_dump -- DIR [meta-prefix]`
use tether_shared::journal::{Journal, JournalOptions, LogName};
use tether_shared::protocol::Seq;

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let mut args = std::env::args().skip(1);
    let dir = args.next().ok_or("usage: journal_dump DIR [meta-prefix]")?;
    let prefix = args.next().unwrap_or_default();
    let (journal, recovered) =
        Journal::open(std::path::Path::new(&dir), &JournalOptions::default())?;
    for (name, s) in &recovered.logs {
        println!(
            "log {name}: {} records, {}..={}",
            s.records, s.first, s.last
        );
        if std::env::var("DUMP_LOG").as_deref() == Ok(name.as_str()) {
            for r in
                journal
                    .handle()
                    .read_log(&LogName::new(name.clone())?, Seq::ZERO, usize::MAX)?
            {
                println!("  {} {}", r.seq, String::from_utf8_lossy(&r.payload));
            }
        }
    }
    for (k, v) in journal.handle().scan_meta(&prefix)? {
        let shown = if v.len() == 8 {
            u64::from_be_bytes(v.clone().try_into().unwrap_or_default()).to_string()
        } else {
            String::from_utf8_lossy(&v).chars().take(200).collect()
        };
        println!("meta {k} = {shown}");
    }
    Ok(())
}
