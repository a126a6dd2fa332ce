//! Progress bars for file transfers (hidden when stderr is not a terminal).

use std::cell::RefCell;

use fumi_client::Progress;
use indicatif::{ProgressBar, ProgressStyle};

/// Draws one bar per transfer on stderr.
#[derive(Default)]
pub struct Bar {
    current: RefCell<Option<ProgressBar>>,
}

impl Progress for Bar {
    fn begin(&self, label: &str, total: u64) {
        let bar = ProgressBar::new(total);
        bar.set_style(
            ProgressStyle::with_template("{msg} [{wide_bar}] {bytes}/{total_bytes} {bytes_per_sec}")
                .expect("template is valid")
                .progress_chars("=> "),
        );
        bar.set_message(label.to_owned());
        *self.current.borrow_mut() = Some(bar);
    }

    fn set(&self, done: u64) {
        if let Some(bar) = &*self.current.borrow() {
            bar.set_position(done);
        }
    }

    fn end(&self) {
        if let Some(bar) = self.current.borrow_mut().take() {
            bar.finish_and_clear();
        }
    }

    fn note(&self, message: &str) {
        match &*self.current.borrow() {
            Some(bar) => bar.suspend(|| eprintln!("{message}")),
            None => eprintln!("{message}"),
        }
    }
}
