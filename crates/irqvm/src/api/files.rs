//! The API's file work on a thread of its own. The `api` thread and the threads `tiny_http`
//! starts run under `seccomp::Role::Api`, which allows no `open`, `mkdir` or `fsync`
//! (docs/security.md). Writing a snapshot (`vm.snapshot`) and creating a trace file
//! (`trace.start`) need them, so those jobs run on `api-files`: a thread started, unfiltered, by
//! the caller of `ApiServer::start` before the API thread installs its filter (a filter passes
//! to every thread a filtered thread creates, so it cannot be started later). It runs only jobs
//! the API thread hands it, one at a time; nothing a guest does reaches it.

use std::sync::mpsc;

type Job = Box<dyn FnOnce() + Send>;

/// The handle of the `api-files` thread; the thread ends when the last handle is dropped.
pub struct FileWorker {
    jobs: mpsc::Sender<Job>,
}

impl FileWorker {
    /// Starts the thread (on the caller's thread, so with the caller's seccomp state).
    pub fn start() -> std::io::Result<Self> {
        let (jobs, queue) = mpsc::channel::<Job>();
        std::thread::Builder::new()
            .name("api-files".into())
            .spawn(move || {
                for job in queue {
                    job();
                }
            })?;
        Ok(Self { jobs })
    }

    /// Runs `job` on the thread and returns its result; `None` if the thread is gone.
    pub fn run<T: Send + 'static>(&self, job: impl FnOnce() -> T + Send + 'static) -> Option<T> {
        let (answer, result) = mpsc::sync_channel(1);
        let wrapped: Job = Box::new(move || {
            let _ = answer.send(job());
        });
        self.jobs.send(wrapped).ok()?;
        result.recv().ok()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn jobs_run_on_the_worker_thread_in_order() {
        let worker = FileWorker::start().unwrap();
        let name = worker.run(|| std::thread::current().name().map(String::from));
        assert_eq!(name, Some(Some("api-files".to_string())));
        assert_eq!(worker.run(|| 1 + 1), Some(2));
    }
}
