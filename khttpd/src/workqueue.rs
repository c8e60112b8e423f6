//! A model of the kernel's Concurrency Managed Workqueue (cmwq) on tokio.
//!
//! kHTTPd and kecho got their big throughput jump by moving from one kthread per connection to cmwq:
//! a shared pool of workers that grows when work is waiting and shrinks when it is idle. Every
//! connection user space serves is one work item on such a queue, so the same design is measurable
//! here.
//!
//! | kernel (`kernel/workqueue.c`)                | here                                                   |
//! |----------------------------------------------|--------------------------------------------------------|
//! | `struct workqueue_struct`                     | [`WorkQueue`]                                          |
//! | `alloc_workqueue(name, flags, max_active)`    | [`WorkQueue::alloc`] with a [`Config`]                 |
//! | `WQ_UNBOUND`: shared unbound worker pool       | [`Kind::Unbound`]: one pool on the caller's tokio runtime |
//! | per-CPU (bound) worker pools                  | [`Kind::Bound`]: one pool per CPU, each a single-thread runtime pinned to its CPU |
//! | `struct work_struct`                          | [`Work`]: a boxed future                               |
//! | `queue_work()`                                | [`WorkQueue::queue_work`]; bound queues use the submitting CPU's pool |
//! | kworker                                       | a worker task; it runs one item at a time              |
//! | `create_worker()` when work is pending and no worker is idle | the same rule in `Pool::enqueue`, up to `max_active` |
//! | `max_active` (per pool workqueue)             | [`Config::max_active`], per pool                       |
//! | idle worker timeout (`IDLE_WORKER_TIMEOUT`)   | [`Config::idle_timeout`]; [`Config::min_idle`] workers stay |
//! | `flush_workqueue()`                           | [`WorkQueue::flush`]: waits for every item queued before the call (flush colours) |
//! | `destroy_workqueue()`                         | [`WorkQueue::destroy`]: drains, then stops every worker |
//!
//! Idle workers wait on a stack (most recently idle first, like the kernel's idle list), so under
//! light load the same few workers stay warm and the others time out and retire.

use std::{
    collections::VecDeque,
    fmt,
    future::Future,
    pin::Pin,
    sync::{
        atomic::{AtomicBool, AtomicU64, Ordering},
        Arc, Mutex,
    },
    thread,
    time::Duration,
};

use tokio::{
    runtime::Handle,
    sync::{oneshot, Notify},
};

/// One work item: the kernel's `work_struct` with its function.
pub type Work = Pin<Box<dyn Future<Output = ()> + Send + 'static>>;

/// Where work runs.
#[derive(
    Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum, serde::Deserialize, serde::Serialize,
)]
#[serde(rename_all = "lowercase")]
pub enum Kind {
    /// One shared pool on the runtime that allocated the queue (`WQ_UNBOUND`).
    Unbound,
    /// One pool per CPU; work runs on the pool of the CPU that queued it.
    Bound,
}

impl fmt::Display for Kind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Kind::Unbound => "unbound",
            Kind::Bound => "bound",
        })
    }
}

/// The arguments of `alloc_workqueue`, plus the pool tunables the kernel keeps as constants.
#[derive(Clone, Debug)]
pub struct Config {
    pub name: String,
    pub kind: Kind,
    /// Most items running at once in one pool.
    pub max_active: usize,
    /// Idle workers that never retire, per pool.
    pub min_idle: usize,
    /// How long a worker stays idle before it retires.
    pub idle_timeout: Duration,
}

impl Config {
    pub fn new(name: &str, kind: Kind, max_active: usize) -> Self {
        Config {
            name: name.to_owned(),
            kind,
            max_active: max_active.max(1),
            min_idle: 2,
            idle_timeout: Duration::from_secs(10),
        }
    }
}

/// `queue_work` on a queue that is being destroyed.
#[derive(Debug, PartialEq, Eq)]
pub struct Destroyed;

impl fmt::Display for Destroyed {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("work queue is being destroyed")
    }
}

impl std::error::Error for Destroyed {}

/// A snapshot of a queue's pools, summed over pools.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Stats {
    /// Items queued and not yet started.
    pub pending: usize,
    /// Items running.
    pub active: usize,
    /// Workers alive (running an item or idle).
    pub workers: usize,
    /// Workers waiting for work.
    pub idle: usize,
    /// Items finished since the queue was allocated.
    pub completed: u64,
}

pub struct WorkQueue {
    config: Config,
    /// One pool for unbound queues, one per CPU for bound ones.
    pools: Vec<Arc<Pool>>,
    /// Bound queues: the CPU of each pool (the CPUs the process may run on, e.g. {2, 3} in a
    /// cpuset), in `pools`' order.
    cpus: Vec<usize>,
    /// The single-thread runtimes of a bound queue's pools, stopped by `destroy`.
    cpu_runtimes: Mutex<Vec<CpuRuntime>>,
    dying: AtomicBool,
    /// Every queued item holds the colour current when it was queued; see `flush`.
    color: Mutex<FlushColor>,
    /// Serialises flushes so each waits for everything queued before it.
    flush_lock: tokio::sync::Mutex<()>,
}

impl WorkQueue {
    /// `alloc_workqueue`. Unbound queues run on the current tokio runtime; bound queues start one
    /// pinned single-thread runtime per CPU the process may run on (its affinity).
    pub fn alloc(config: Config) -> std::io::Result<Arc<WorkQueue>> {
        let mut cpu_runtimes = Vec::new();
        let (cpus, pools) = match config.kind {
            Kind::Unbound => (Vec::new(), vec![Pool::new(&config, Handle::current())]),
            Kind::Bound => {
                let cpus = allowed_cpus()?;
                let pools = cpus
                    .iter()
                    .map(|&cpu| {
                        let runtime = CpuRuntime::start(&config.name, cpu)?;
                        let pool = Pool::new(&config, runtime.handle.clone());
                        cpu_runtimes.push(runtime);
                        Ok(pool)
                    })
                    .collect::<std::io::Result<_>>()?;
                (cpus, pools)
            }
        };
        Ok(Arc::new(WorkQueue {
            config,
            pools,
            cpus,
            cpu_runtimes: Mutex::new(cpu_runtimes),
            dying: AtomicBool::new(false),
            color: Mutex::new(FlushColor::new()),
            flush_lock: tokio::sync::Mutex::new(()),
        }))
    }

    pub fn name(&self) -> &str {
        &self.config.name
    }

    pub fn kind(&self) -> Kind {
        self.config.kind
    }

    /// `queue_work`: run `work` on a worker of this queue.
    pub fn queue_work(
        &self,
        work: impl Future<Output = ()> + Send + 'static,
    ) -> Result<(), Destroyed> {
        if self.dying.load(Ordering::Acquire) {
            return Err(Destroyed);
        }
        let job = Job {
            work: Box::pin(work),
            _color: self.color.lock().unwrap().holder.clone(),
        };
        self.submitting_pool().enqueue(job);
        Ok(())
    }

    fn submitting_pool(&self) -> &Arc<Pool> {
        match self.config.kind {
            Kind::Unbound => &self.pools[0],
            Kind::Bound => {
                let cpu = rustix::thread::sched_getcpu();
                // A CPU outside the set (the set changed since): any pool will do.
                let pool = self.cpus.iter().position(|&c| c == cpu);
                &self.pools[pool.unwrap_or(cpu % self.pools.len())]
            }
        }
    }

    /// `flush_workqueue`: returns once every item queued before the call has finished.
    pub async fn flush(&self) {
        let _one_flush_at_a_time = self.flush_lock.lock().await;
        let previous = std::mem::replace(&mut *self.color.lock().unwrap(), FlushColor::new());
        previous.wait().await;
    }

    /// `destroy_workqueue`: refuses new work, waits for all queued work, then stops every worker.
    pub async fn destroy(&self) {
        self.dying.store(true, Ordering::Release);
        self.flush().await;
        for pool in &self.pools {
            pool.stop().await;
        }
        let runtimes = std::mem::take(&mut *self.cpu_runtimes.lock().unwrap());
        for runtime in runtimes {
            runtime.stop();
        }
    }

    pub fn stats(&self) -> Stats {
        self.pools.iter().fold(Stats::default(), |sum, pool| {
            let state = pool.state.lock().unwrap();
            Stats {
                pending: sum.pending + state.pending.len(),
                active: sum.active + state.active,
                workers: sum.workers + state.workers,
                idle: sum.idle + state.idle.len(),
                completed: sum.completed + pool.completed.load(Ordering::Relaxed),
            }
        })
    }
}

/// A flush colour: items hold `holder`; when the last holder is dropped, `all_done` resolves.
struct FlushColor {
    holder: Arc<oneshot::Sender<()>>,
    all_done: oneshot::Receiver<()>,
}

impl FlushColor {
    fn new() -> Self {
        let (sender, all_done) = oneshot::channel();
        FlushColor {
            holder: Arc::new(sender),
            all_done,
        }
    }

    async fn wait(self) {
        drop(self.holder);
        // The sender is never used to send: the channel closes when its last holder is dropped.
        let _ = self.all_done.await;
    }
}

struct Job {
    work: Work,
    _color: Arc<oneshot::Sender<()>>,
}

/// A worker pool (`struct worker_pool`).
struct Pool {
    handle: Handle,
    max_active: usize,
    min_idle: usize,
    idle_timeout: Duration,
    state: Mutex<PoolState>,
    completed: AtomicU64,
    /// Signalled when the last worker of a stopping pool exits.
    all_exited: Notify,
}

#[derive(Default)]
struct PoolState {
    pending: VecDeque<Job>,
    workers: usize,
    active: usize,
    /// Idle workers, most recently idle last; a job is handed over through the sender.
    idle: Vec<IdleWorker>,
    next_worker_id: u64,
    stopping: bool,
}

enum Next {
    Run(Job),
    Retire,
    Wait(oneshot::Receiver<Job>),
}

struct IdleWorker {
    id: u64,
    wake: oneshot::Sender<Job>,
}

impl Pool {
    fn new(config: &Config, handle: Handle) -> Arc<Pool> {
        Arc::new(Pool {
            handle,
            max_active: config.max_active,
            min_idle: config.min_idle,
            idle_timeout: config.idle_timeout,
            state: Mutex::new(PoolState::default()),
            completed: AtomicU64::new(0),
            all_exited: Notify::new(),
        })
    }

    /// Hands `job` to an idle worker, or starts a worker for it, or leaves it pending when
    /// `max_active` workers are busy.
    fn enqueue(self: &Arc<Self>, mut job: Job) {
        let mut state = self.state.lock().unwrap();
        while let Some(idle) = state.idle.pop() {
            match idle.wake.send(job) {
                Ok(()) => {
                    state.active += 1;
                    return;
                }
                // That worker timed out and is retiring; try the next one.
                Err(returned) => job = returned,
            }
        }
        if state.workers < self.max_active {
            state.workers += 1;
            state.active += 1;
            let id = state.next_worker_id;
            state.next_worker_id += 1;
            drop(state);
            self.handle.spawn(Arc::clone(self).worker(id, job));
        } else {
            state.pending.push_back(job);
        }
    }

    async fn worker(self: Arc<Self>, id: u64, first: Job) {
        let mut job = first;
        loop {
            let Job {
                work,
                _color: color,
            } = job;
            work.await;
            self.completed.fetch_add(1, Ordering::Relaxed);
            // The item is done: let flushes waiting for its colour go on.
            drop(color);
            // Boxed: the worker's future is held for as long as its item runs (a keep-alive
            // connection's whole life), so it should not carry the idle wait's timer.
            match Box::pin(self.next_job(id)).await {
                Some(next) => job = next,
                None => return,
            }
        }
    }

    /// Called by a worker that finished an item: the next item, or `None` when the worker retires.
    async fn next_job(&self, id: u64) -> Option<Job> {
        let mut next = {
            let mut state = self.state.lock().unwrap();
            state.active -= 1;
            self.pending_or_idle(&mut state, id)
        };
        loop {
            let mut woken = match next {
                Next::Run(job) => return Some(job),
                Next::Retire => return None,
                Next::Wait(woken) => woken,
            };
            let handed_over = match tokio::time::timeout(self.idle_timeout, &mut woken).await {
                Ok(handed_over) => handed_over.ok(),
                // A job may have been handed over between the timeout and now.
                Err(_elapsed) => woken.try_recv().ok(),
            };
            if handed_over.is_some() {
                // `enqueue` counted it as active when it handed it over.
                return handed_over;
            }
            let mut state = self.state.lock().unwrap();
            // Timed out, or the pool is stopping and dropped our wake-up sender.
            state.idle.retain(|idle| idle.id != id);
            next = if state.stopping || state.workers > self.min_idle {
                self.retire(&mut state);
                Next::Retire
            } else {
                self.pending_or_idle(&mut state, id)
            };
        }
    }

    /// What a worker without a job does next: run a pending job, retire, or wait as an idle worker.
    fn pending_or_idle(&self, state: &mut PoolState, id: u64) -> Next {
        if let Some(job) = state.pending.pop_front() {
            state.active += 1;
            return Next::Run(job);
        }
        if state.stopping {
            self.retire(state);
            return Next::Retire;
        }
        let (wake, woken) = oneshot::channel();
        state.idle.push(IdleWorker { id, wake });
        Next::Wait(woken)
    }

    fn retire(&self, state: &mut PoolState) {
        state.workers -= 1;
        if state.stopping && state.workers == 0 {
            self.all_exited.notify_one();
        }
    }

    /// Wakes every idle worker to retire and waits until all workers are gone.
    async fn stop(&self) {
        let exited = self.all_exited.notified();
        {
            let mut state = self.state.lock().unwrap();
            state.stopping = true;
            if state.workers == 0 {
                return;
            }
            // Dropping the senders wakes the idle workers, which see `stopping` and retire.
            state.idle.clear();
        }
        exited.await;
    }
}

/// The single-thread runtime behind one CPU's pool of a bound queue.
struct CpuRuntime {
    handle: Handle,
    stop: oneshot::Sender<()>,
    thread: thread::JoinHandle<()>,
}

impl CpuRuntime {
    fn start(queue: &str, cpu: usize) -> std::io::Result<CpuRuntime> {
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()?;
        let handle = runtime.handle().clone();
        let (stop, stopped) = oneshot::channel::<()>();
        let thread = thread::Builder::new()
            .name(format!("{queue}/{cpu}"))
            .spawn(move || {
                pin_to_cpu(cpu);
                runtime.block_on(async {
                    let _ = stopped.await;
                });
            })?;
        Ok(CpuRuntime {
            handle,
            stop,
            thread,
        })
    }

    fn stop(self) {
        let _ = self.stop.send(());
        let _ = self.thread.join();
    }
}

/// The CPUs this thread may run on (its affinity: a cpuset or `taskset` narrows it).
fn allowed_cpus() -> std::io::Result<Vec<usize>> {
    let set = rustix::thread::sched_getaffinity(None)?;
    Ok((0..rustix::thread::CpuSet::MAX_CPU)
        .filter(|&cpu| set.is_set(cpu))
        .collect())
}

fn pin_to_cpu(cpu: usize) {
    let mut set = rustix::thread::CpuSet::new();
    set.set(cpu);
    if let Err(e) = rustix::thread::sched_setaffinity(None, &set) {
        log::warn!("cannot pin worker pool to CPU {cpu}: {e}");
    }
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::AtomicUsize;

    use super::*;

    fn unbound(max_active: usize) -> Arc<WorkQueue> {
        WorkQueue::alloc(Config::new("test", Kind::Unbound, max_active)).unwrap()
    }

    /// Lets every ready task on the test's single-thread runtime run until it waits.
    async fn settle() {
        for _ in 0..10 {
            tokio::task::yield_now().await;
        }
    }

    #[tokio::test(start_paused = true)]
    async fn max_active_is_respected() {
        let queue = unbound(4);
        let running = Arc::new(AtomicUsize::new(0));
        let peak = Arc::new(AtomicUsize::new(0));
        for _ in 0..100 {
            let (running, peak) = (running.clone(), peak.clone());
            queue
                .queue_work(async move {
                    let now = running.fetch_add(1, Ordering::SeqCst) + 1;
                    peak.fetch_max(now, Ordering::SeqCst);
                    tokio::time::sleep(Duration::from_millis(10)).await;
                    running.fetch_sub(1, Ordering::SeqCst);
                })
                .unwrap();
        }
        let stats = queue.stats();
        assert_eq!(stats.workers, 4);
        assert_eq!(stats.pending, 96);
        queue.flush().await;
        assert_eq!(peak.load(Ordering::SeqCst), 4);
        assert_eq!(queue.stats().completed, 100);
    }

    #[tokio::test(start_paused = true)]
    async fn workers_grow_under_load_and_retire_when_idle() {
        let queue = unbound(16);
        let release = Arc::new(Notify::new());
        for _ in 0..8 {
            let release = release.clone();
            queue
                .queue_work(async move { release.notified().await })
                .unwrap();
        }
        tokio::task::yield_now().await;
        let stats = queue.stats();
        assert_eq!((stats.workers, stats.active, stats.idle), (8, 8, 0));

        release.notify_waiters();
        queue.flush().await;
        settle().await;
        let stats = queue.stats();
        assert_eq!((stats.workers, stats.active, stats.idle), (8, 0, 8));

        // Idle workers stay until the timeout, then all but `min_idle` retire.
        tokio::time::sleep(Duration::from_secs(9)).await;
        assert_eq!(queue.stats().workers, 8);
        tokio::time::sleep(Duration::from_secs(2)).await;
        let stats = queue.stats();
        assert_eq!((stats.workers, stats.idle), (2, 2));

        // An idle worker takes new work instead of a new worker being started.
        let ran = Arc::new(AtomicBool::new(false));
        let flag = ran.clone();
        queue
            .queue_work(async move { flag.store(true, Ordering::SeqCst) })
            .unwrap();
        queue.flush().await;
        settle().await;
        assert!(ran.load(Ordering::SeqCst));
        assert_eq!(queue.stats().workers, 2);
        queue.destroy().await;
        assert_eq!(queue.stats().workers, 0);
    }

    #[tokio::test(start_paused = true)]
    async fn flush_waits_only_for_earlier_work() {
        let queue = unbound(8);
        let done = Arc::new(AtomicUsize::new(0));
        for i in 0..10u64 {
            let done = done.clone();
            queue
                .queue_work(async move {
                    tokio::time::sleep(Duration::from_millis(10 * i)).await;
                    done.fetch_add(1, Ordering::SeqCst);
                })
                .unwrap();
        }
        queue.flush().await;
        assert_eq!(done.load(Ordering::SeqCst), 10);

        // Work queued after a flush started does not hold that flush up.
        let never = Arc::new(Notify::new());
        let wait = never.clone();
        queue
            .queue_work(async move { wait.notified().await })
            .unwrap();
        let flushed = tokio::time::timeout(Duration::from_secs(1), queue.flush()).await;
        assert!(
            flushed.is_err(),
            "flush must wait for the blocked item queued before it"
        );
        never.notify_one();
        queue.flush().await;
    }

    #[tokio::test(start_paused = true)]
    async fn destroy_drains_then_refuses_work() {
        let queue = unbound(2);
        let done = Arc::new(AtomicUsize::new(0));
        for _ in 0..50 {
            let done = done.clone();
            queue
                .queue_work(async move {
                    tokio::time::sleep(Duration::from_millis(1)).await;
                    done.fetch_add(1, Ordering::SeqCst);
                })
                .unwrap();
        }
        queue.destroy().await;
        assert_eq!(done.load(Ordering::SeqCst), 50);
        assert_eq!(
            queue.stats(),
            Stats {
                completed: 50,
                ..Stats::default()
            }
        );
        assert_eq!(queue.queue_work(async {}), Err(Destroyed));
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn hundred_thousand_items_run_exactly_once() {
        for kind in [Kind::Unbound, Kind::Bound] {
            let queue = WorkQueue::alloc(Config::new("many", kind, 64)).unwrap();
            let runs: Arc<Vec<AtomicUsize>> =
                Arc::new((0..100_000).map(|_| AtomicUsize::new(0)).collect());
            for i in 0..100_000 {
                let runs = runs.clone();
                queue
                    .queue_work(async move {
                        if i % 7 == 0 {
                            tokio::task::yield_now().await;
                        }
                        runs[i].fetch_add(1, Ordering::Relaxed);
                    })
                    .unwrap();
            }
            queue.destroy().await;
            let wrong: Vec<_> = (0..runs.len())
                .filter(|&i| runs[i].load(Ordering::Relaxed) != 1)
                .collect();
            assert!(
                wrong.is_empty(),
                "{kind}: {} items ran other than once, e.g. {:?}",
                wrong.len(),
                &wrong[..wrong.len().min(5)]
            );
            assert_eq!(queue.stats().completed, 100_000);
        }
    }

    /// Queues one item from a thread pinned to `cpu` and returns the CPU it ran on.
    fn ran_on_when_queued_from(queue: &Arc<WorkQueue>, cpu: usize) -> usize {
        let queue = queue.clone();
        let (ran_on, seen) = std::sync::mpsc::channel();
        thread::spawn(move || {
            pin_to_cpu(cpu);
            queue
                .queue_work(async move {
                    ran_on.send(rustix::thread::sched_getcpu()).unwrap();
                })
                .unwrap();
        })
        .join()
        .unwrap();
        seen.recv_timeout(Duration::from_secs(10)).unwrap()
    }

    #[test]
    fn bound_work_runs_on_the_submitting_cpu() {
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        let queue = runtime
            .block_on(async { WorkQueue::alloc(Config::new("bound", Kind::Bound, 4)).unwrap() });
        for cpu in allowed_cpus().unwrap() {
            assert_eq!(ran_on_when_queued_from(&queue, cpu), cpu);
        }
        runtime.block_on(queue.destroy());
    }

    /// In a CPU set that does not start at 0 (a cpuset such as {2, 3}; here the last CPU alone),
    /// the pools are the set's CPUs: work queued there runs there.
    #[test]
    fn bound_pools_follow_the_cpu_set() {
        let last = *allowed_cpus().unwrap().last().unwrap();
        thread::spawn(move || {
            pin_to_cpu(last);
            let runtime = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .unwrap();
            let queue = runtime.block_on(async {
                WorkQueue::alloc(Config::new("cpuset", Kind::Bound, 4)).unwrap()
            });
            assert_eq!(queue.cpus, vec![last]);
            assert_eq!(ran_on_when_queued_from(&queue, last), last);
            runtime.block_on(queue.destroy());
        })
        .join()
        .unwrap();
    }
}
