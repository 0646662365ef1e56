//! Progress bars for large transfers, driven by hf-hub progress events.

use std::collections::HashMap;
use std::sync::Mutex;

use hf_hub::progress::{DownloadEvent, ProgressEvent, ProgressHandler, UploadEvent};
use indicatif::{ProgressBar, ProgressStyle};

use super::HubCache;

/// Files at least this large get a visible progress bar.
pub(crate) const PROGRESS_THRESHOLD: u64 = 16 << 20;

impl HubCache {
    pub(super) fn bar(&self, total: u64, label: &str) -> Option<ProgressBar> {
        if !self.options.progress || total < PROGRESS_THRESHOLD {
            return None;
        }
        let bar = ProgressBar::new(total);
        bar.set_style(
            ProgressStyle::with_template(
                "{msg} [{bar:30}] {bytes}/{total_bytes} {bytes_per_sec} eta {eta}",
            )
            .expect("static template")
            .progress_chars("=> "),
        );
        bar.set_message(label.rsplit('/').next().unwrap_or(label).to_owned());
        Some(bar)
    }
}

/// Drives an indicatif bar from hf-hub progress events.
pub(super) struct BarHandler {
    bar: ProgressBar,
    per_file: Mutex<HashMap<String, u64>>,
}

impl BarHandler {
    pub(super) fn new(bar: ProgressBar) -> Self {
        Self {
            bar,
            per_file: Mutex::new(HashMap::new()),
        }
    }
}

impl ProgressHandler for BarHandler {
    fn on_progress(&self, event: &ProgressEvent) {
        match event {
            ProgressEvent::Download(DownloadEvent::Progress { files }) => {
                let mut map = self.per_file.lock().expect("progress map");
                for f in files {
                    map.insert(f.filename.clone(), f.bytes_completed);
                }
                self.bar.set_position(map.values().sum());
            }
            ProgressEvent::Download(DownloadEvent::AggregateProgress {
                bytes_completed, ..
            })
            | ProgressEvent::Upload(UploadEvent::Progress {
                bytes_completed, ..
            }) => self.bar.set_position(*bytes_completed),
            ProgressEvent::Upload(UploadEvent::Committing) => {
                self.bar.set_position(self.bar.length().unwrap_or(0));
                self.bar.set_message("committing");
            }
            _ => {}
        }
    }
}
