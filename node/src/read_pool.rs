//! The read pool: where the API and the router run their fjall reads, so that a read waiting
//! on the disk never holds one of the few async workers (and every connection behind it).
//!
//! A fixed number of threads ([`READ_THREADS`]) take jobs from one bounded queue
//! ([`READ_QUEUE_MAX`]); a caller whose job finds the queue full waits for room (backpressure).
//! Under load a thread finds the next job waiting and runs it without sleeping, so a burst of
//! small reads costs few thread wake-ups, where a thread per blocking call (tokio's blocking
//! pool grows to hundreds) costs a wake-up and a context switch each, on two cores.

use std::sync::{Arc, Mutex};
use tokio::sync::{mpsc, oneshot};

/// Threads that run reads.
pub const READ_THREADS: usize = 2;
/// Reads waiting for a thread; past it, callers wait.
pub const READ_QUEUE_MAX: usize = 4096;

type Job = Box<dyn FnOnce() + Send>;

#[derive(Clone)]
pub struct ReadPool {
    jobs: mpsc::Sender<Job>,
}

impl ReadPool {
    pub fn start() -> ReadPool {
        let (jobs, receiver) = mpsc::channel::<Job>(READ_QUEUE_MAX);
        let receiver = Arc::new(Mutex::new(receiver));
        for n in 0..READ_THREADS {
            let receiver = Arc::clone(&receiver);
            std::thread::Builder::new()
                .name(format!("oneid-read-{n}"))
                .spawn(move || loop {
                    // One thread waits on the queue, the other on the lock: each job goes to
                    // exactly one of them.
                    let job = receiver.lock().expect("read queue lock").blocking_recv();
                    match job {
                        Some(job) => job(),
                        None => return,
                    }
                })
                .expect("starting a read thread");
        }
        ReadPool { jobs }
    }

    /// Runs `read` on a read thread and answers its result.
    pub async fn run<T: Send + 'static>(&self, read: impl FnOnce() -> T + Send + 'static) -> T {
        let (reply, answer) = oneshot::channel();
        let job: Job = Box::new(move || {
            let _ = reply.send(read());
        });
        self.jobs
            .send(job)
            .await
            .unwrap_or_else(|_| panic!("the read threads are gone"));
        answer.await.expect("a read panics only to stop the node")
    }
}
