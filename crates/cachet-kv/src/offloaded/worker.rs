//! The upload worker of the offloaded caches: one long-lived thread per cache (shared by its
//! clones) that turns a host layer into tensors on the compute device and waits for the device
//! to finish the copy, so the time it reports is the transfer's, not the time to queue it.

use std::sync::mpsc::{Receiver, Sender, SyncSender, channel, sync_channel};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use burn::tensor::{Device, Tensor};
use cachet_tensor::TensorError;

use super::host::HostLayer;
use crate::error::{KvError, Result};

/// A finished upload: the layer's keys and values on the device and the time the copy took.
pub(crate) type Uploaded = Result<(Tensor<4>, Tensor<4>, Duration)>;

struct Job {
    layer: Arc<HostLayer>,
    device: Device,
    reply: SyncSender<Uploaded>,
}

/// The worker thread and the queue it reads; the thread ends when the last handle is dropped.
#[derive(Debug)]
pub(crate) struct UploadWorker {
    jobs: Mutex<Option<Sender<Job>>>,
    thread: Mutex<Option<JoinHandle<()>>>,
}

impl std::fmt::Debug for Job {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Job").finish_non_exhaustive()
    }
}

/// An upload queued on the worker.
#[derive(Debug)]
pub(crate) struct Pending {
    reply: Receiver<Uploaded>,
}

impl Pending {
    /// Waits for the upload; returns it with the time the caller spent blocked.
    pub fn wait(self) -> (Uploaded, Duration) {
        let start = Instant::now();
        let result = self.reply.recv().unwrap_or_else(|_| {
            Err(KvError::Transfer(TensorError::Transfer {
                what: "kv layer upload".into(),
                reason: "the upload worker stopped".into(),
            }))
        });
        (result, start.elapsed())
    }
}

impl UploadWorker {
    /// Starts the worker thread.
    pub fn start() -> Result<Self> {
        let (jobs, queue) = channel::<Job>();
        let thread = std::thread::Builder::new()
            .name("kv-upload".into())
            .spawn(move || {
                for job in queue {
                    let start = Instant::now();
                    let (keys, values) = job.layer.upload(&job.device);
                    // The copy is done when the device says so, not when it was queued.
                    let synced = job.device.sync().map_err(|err| {
                        KvError::Transfer(TensorError::Transfer {
                            what: "kv layer upload".into(),
                            reason: err.to_string(),
                        })
                    });
                    // Release the host layer before answering, so the cache can append to it
                    // without copying.
                    drop(job.layer);
                    let reply = synced.map(|()| (keys, values, start.elapsed()));
                    let _ = job.reply.send(reply);
                }
            })
            .map_err(|err| {
                KvError::Transfer(TensorError::Transfer {
                    what: "kv upload worker".into(),
                    reason: err.to_string(),
                })
            })?;
        Ok(Self {
            jobs: Mutex::new(Some(jobs)),
            thread: Mutex::new(Some(thread)),
        })
    }

    /// Queues the upload of `layer` to `device`.
    pub fn submit(&self, layer: Arc<HostLayer>, device: &Device) -> Pending {
        let (reply, answer) = sync_channel(1);
        let job = Job {
            layer,
            device: device.clone(),
            reply,
        };
        if let Some(jobs) = self.jobs.lock().expect("worker queue").as_ref() {
            // A send fails only if the thread is gone; `wait` then reports it.
            let _ = jobs.send(job);
        }
        Pending { reply: answer }
    }
}

impl Drop for UploadWorker {
    fn drop(&mut self) {
        self.jobs.lock().map(|mut j| j.take()).ok();
        if let Some(thread) = self.thread.lock().ok().and_then(|mut t| t.take()) {
            let _ = thread.join();
        }
    }
}
