//! `sensor top`: a live, full-screen view of the per-client counters, like top or iftop.
//!
//! The view polls the agent's local API (`/v1/clients`) on a background thread, so a slow or
//! absent agent never freezes the keyboard; sorting, windowing and filtering happen in the
//! agent through the query string. Everything that decides what is shown (key handling, row
//! formatting, drawing) is pure and tested without a terminal.

use std::{
    io::IsTerminal as _,
    path::PathBuf,
    sync::{
        atomic::{AtomicBool, Ordering},
        mpsc,
    },
    time::{Duration, Instant, SystemTime},
};

use anyhow::Context as _;
use crossterm::event::{self, Event, KeyCode, KeyEvent, KeyEventKind, KeyModifiers};
use ratatui::{
    Frame,
    layout::{Constraint, Layout},
    style::{Color, Modifier, Style},
    text::{Line, Span},
    widgets::{Cell, Paragraph, Row, Table, Wrap},
};

use crate::{
    cli::TopArgs,
    model::aggregate::Window,
    model::keys::By,
    model::report::{ClientRow, Query},
    views::human_bytes,
};

/// One column of the table.
struct Column {
    title: &'static str,
    /// The API's sort field, where the column sorts.
    sort: Option<&'static str>,
    /// The key that sorts by this column.
    key: Option<char>,
    /// Fixed width; `None` sizes the column to its content.
    width: Option<u16>,
}

const COLUMNS: [Column; 12] = [
    Column {
        title: "CLIENT",
        sort: Some("client"),
        key: None,
        width: None,
    },
    Column {
        title: "GROUP",
        sort: None,
        key: None,
        width: None,
    },
    Column {
        title: "REQUESTS",
        sort: Some("requests"),
        key: Some('r'),
        width: Some(10),
    },
    Column {
        title: "BYTES_IN",
        sort: Some("bytes_in"),
        key: Some('i'),
        width: Some(11),
    },
    Column {
        title: "BYTES_OUT",
        sort: Some("bytes_out"),
        key: Some('o'),
        width: Some(11),
    },
    Column {
        title: "CONNS",
        sort: Some("connections"),
        key: Some('c'),
        width: Some(8),
    },
    Column {
        title: "OPEN",
        sort: Some("open_connections"),
        key: Some('n'),
        width: Some(6),
    },
    Column {
        title: "PEAK",
        sort: Some("peak_open_connections"),
        key: Some('k'),
        width: Some(6),
    },
    Column {
        title: "OUT/IN",
        sort: Some("out_in_ratio"),
        key: Some('t'),
        width: Some(9),
    },
    Column {
        title: "CV",
        sort: Some("interval_cv"),
        key: Some('v'),
        width: Some(6),
    },
    Column {
        title: "ACTIVE(s)",
        sort: Some("active_seconds"),
        key: Some('a'),
        width: Some(9),
    },
    Column {
        title: "LAST_SEEN",
        sort: Some("last_seen"),
        key: Some('l'),
        width: Some(12),
    },
];

/// The help line.
const KEYS_HELP: &str = "sort: r requests  i bytes_in  o bytes_out  c conns  n open  k peak  \
     t out/in  v cv  a active  l last_seen  </> or ←/→ move sort | w window  g address/group  \
     / filter  p pause  ↑/↓ PgUp/PgDn Home/End scroll  q quit";

/// The sort field that key `c` selects.
fn sort_field_for_key(c: char) -> Option<&'static str> {
    COLUMNS
        .iter()
        .find(|col| col.key == Some(c))
        .and_then(|col| col.sort)
}

/// What the main loop does after a key.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Action {
    Nothing,
    /// The query changed: fetch now (even while paused).
    Refetch,
    Quit,
}

/// Everything the screen shows.
#[derive(Debug)]
pub struct App {
    pub socket: PathBuf,
    pub interval: Duration,
    pub query: Query,
    pub rows: Vec<ClientRow>,
    /// The last fetch's error, shown until a fetch succeeds.
    pub error: Option<String>,
    /// When the rows on screen were fetched.
    pub refreshed: Option<SystemTime>,
    pub paused: bool,
    /// First row shown.
    pub scroll: usize,
    /// Table rows that fit on screen at the last draw.
    pub page: usize,
    /// Filter text being typed after `/`.
    pub input: Option<String>,
}

impl App {
    pub fn new(socket: PathBuf, interval: Duration, by: By, window: Option<Window>) -> Self {
        Self {
            socket,
            interval,
            query: Query {
                by,
                window,
                ..Query::default()
            },
            rows: Vec::new(),
            error: None,
            refreshed: None,
            paused: false,
            scroll: 0,
            page: 10,
            input: None,
        }
    }

    /// The API path for the current query.
    pub fn api_path(&self) -> String {
        format!("/v1/clients?{}", self.query.to_query_string())
    }

    fn max_scroll(&self) -> usize {
        self.rows.len().saturating_sub(self.page.max(1))
    }

    fn set_sort(&mut self, field: &str) -> Action {
        self.query.sort = field.to_owned();
        self.scroll = 0;
        Action::Refetch
    }

    /// Moves the sort to the previous (`step` -1) or next (+1) sortable column.
    fn move_sort(&mut self, step: isize) -> Action {
        let sortable: Vec<&str> = COLUMNS.iter().filter_map(|c| c.sort).collect();
        let n = sortable.len() as isize;
        let at = sortable
            .iter()
            .position(|s| *s == self.query.sort)
            .map_or(0, |i| i as isize);
        let next = sortable[(at + step).rem_euclid(n) as usize];
        self.set_sort(next)
    }

    /// Applies one key press.
    pub fn handle_key(&mut self, key: KeyEvent) -> Action {
        if key.kind == KeyEventKind::Release {
            return Action::Nothing;
        }
        if key.modifiers.contains(KeyModifiers::CONTROL) && key.code == KeyCode::Char('c') {
            return Action::Quit;
        }
        if let Some(text) = &mut self.input {
            return match key.code {
                KeyCode::Enter => {
                    let f = text.trim().to_owned();
                    self.query.filter = (!f.is_empty()).then_some(f);
                    self.input = None;
                    self.scroll = 0;
                    Action::Refetch
                }
                KeyCode::Esc => {
                    self.input = None;
                    self.scroll = 0;
                    self.query.filter = None;
                    Action::Refetch
                }
                KeyCode::Backspace => {
                    text.pop();
                    Action::Nothing
                }
                KeyCode::Char(c) if !key.modifiers.contains(KeyModifiers::CONTROL) => {
                    text.push(c);
                    Action::Nothing
                }
                _ => Action::Nothing,
            };
        }
        match key.code {
            KeyCode::Char('q') => Action::Quit,
            KeyCode::Char('<') | KeyCode::Left => self.move_sort(-1),
            KeyCode::Char('>') | KeyCode::Right => self.move_sort(1),
            KeyCode::Char('w') => {
                self.query.window = match self.query.window {
                    None => Some(Window::OneMinute),
                    Some(Window::OneMinute) => Some(Window::TenMinutes),
                    Some(Window::TenMinutes) => Some(Window::OneHour),
                    Some(Window::OneHour) => None,
                };
                Action::Refetch
            }
            KeyCode::Char('g') => {
                self.query.by = match self.query.by {
                    By::Address => By::Group,
                    By::Group => By::Identity,
                    By::Identity => By::Forwarded,
                    By::Forwarded => By::Address,
                };
                self.scroll = 0;
                Action::Refetch
            }
            KeyCode::Char('/') => {
                self.input = Some(self.query.filter.clone().unwrap_or_default());
                Action::Nothing
            }
            KeyCode::Char('p') => {
                self.paused = !self.paused;
                if self.paused {
                    Action::Nothing
                } else {
                    Action::Refetch
                }
            }
            KeyCode::Up => {
                self.scroll = self.scroll.saturating_sub(1);
                Action::Nothing
            }
            KeyCode::Down => {
                self.scroll = (self.scroll + 1).min(self.max_scroll());
                Action::Nothing
            }
            KeyCode::PageUp => {
                self.scroll = self.scroll.saturating_sub(self.page.max(1));
                Action::Nothing
            }
            KeyCode::PageDown => {
                self.scroll = (self.scroll + self.page.max(1)).min(self.max_scroll());
                Action::Nothing
            }
            KeyCode::Home => {
                self.scroll = 0;
                Action::Nothing
            }
            KeyCode::End => {
                self.scroll = self.max_scroll();
                Action::Nothing
            }
            KeyCode::Char(c) => match sort_field_for_key(c) {
                Some(field) => self.set_sort(field),
                None => Action::Nothing,
            },
            _ => Action::Nothing,
        }
    }

    /// Takes in a fetch for `path` (ignored when the query has changed since it was sent).
    pub fn apply(&mut self, path: &str, result: Result<Vec<ClientRow>, String>, at: SystemTime) {
        if path != self.api_path() {
            return;
        }
        match result {
            Ok(rows) => {
                self.rows = rows;
                self.error = None;
                self.refreshed = Some(at);
                self.scroll = self.scroll.min(self.max_scroll());
            }
            // Keep the last rows on screen; the header says they are stale and why.
            Err(e) => self.error = Some(e),
        }
    }
}

/// How long before `now` the client was last seen, e.g. "1m05s ago".
pub fn age(last_seen: &str, now: SystemTime) -> String {
    let Ok(t) = humantime::parse_rfc3339(last_seen) else {
        return last_seen.to_owned();
    };
    let s = now.duration_since(t).unwrap_or_default().as_secs();
    match s {
        0..60 => format!("{s}s ago"),
        60..3600 => format!("{}m{:02}s ago", s / 60, s % 60),
        3600..86400 => format!("{}h{:02}m ago", s / 3600, s % 3600 / 60),
        _ => format!("{}d{:02}h ago", s / 86400, s % 86400 / 3600),
    }
}

/// The cells of one row, in `COLUMNS` order. With a window, requests, bytes and connections
/// are that window's.
pub fn row_cells(r: &ClientRow, window: Option<Window>, now: SystemTime) -> [String; 12] {
    let (req, bin, bout, conns) = match window.and_then(|w| r.windows.get(w.name())) {
        Some(w) => (w.requests, w.bytes_in, w.bytes_out, w.connections),
        None => (r.requests, r.bytes_in, r.bytes_out, r.connections),
    };
    [
        r.client.clone(),
        r.group.clone(),
        req.to_string(),
        human_bytes(bin),
        human_bytes(bout),
        conns.to_string(),
        r.open_connections.to_string(),
        r.peak_open_connections.to_string(),
        r.out_in_ratio.map_or("-".into(), |x| format!("{x:.1}")),
        r.interval_cv.map_or("-".into(), |x| format!("{x:.2}")),
        r.active_seconds.to_string(),
        age(&r.last_seen, now),
    ]
}

/// "12:34:56 UTC".
fn clock(t: SystemTime) -> String {
    let s = humantime::format_rfc3339_seconds(t).to_string();
    s.get(11..19).map_or(s.clone(), |hms| format!("{hms} UTC"))
}

/// The header's first line.
pub fn header_line(app: &App) -> String {
    let q = &app.query;
    format!(
        "sensor top | agent {} | by {} | window {} | sort {} | filter {} | {} | {} client{} | \
         refreshed {}",
        app.socket.display(),
        q.by.name(),
        q.window.map_or("total", Window::name),
        q.sort,
        q.filter.as_deref().unwrap_or("-"),
        if app.paused { "PAUSED" } else { "running" },
        app.rows.len(),
        if app.rows.len() == 1 { "" } else { "s" },
        app.refreshed.map_or("never".into(), clock),
    )
}

/// Draws the whole screen.
pub fn draw(frame: &mut Frame, app: &mut App) {
    let [head, body, foot] = Layout::vertical([
        Constraint::Length(2),
        Constraint::Min(1),
        Constraint::Length(2),
    ])
    .areas(frame.area());

    let status = match &app.error {
        Some(e) => Line::from(Span::styled(
            format!(
                "agent unreachable: {e} (retrying every {} ms)",
                app.interval.as_millis()
            ),
            Style::new().fg(Color::Red).add_modifier(Modifier::BOLD),
        )),
        None => Line::from(""),
    };
    frame.render_widget(
        Paragraph::new(vec![
            Line::from(Span::styled(
                header_line(app),
                Style::new().add_modifier(Modifier::BOLD),
            )),
            status,
        ]),
        head,
    );

    // The header row takes one line.
    app.page = usize::from(body.height.saturating_sub(1)).max(1);
    app.scroll = app.scroll.min(app.max_scroll());
    let now = app.refreshed.unwrap_or_else(SystemTime::now);
    let cells: Vec<[String; 12]> = app
        .rows
        .iter()
        .skip(app.scroll)
        .take(app.page)
        .map(|r| row_cells(r, app.query.window, now))
        .collect();
    let widths: Vec<Constraint> = COLUMNS
        .iter()
        .enumerate()
        .map(|(i, col)| {
            let w = col.width.unwrap_or_else(|| {
                let longest = app
                    .rows
                    .iter()
                    .map(|r| if i == 0 { &r.client } else { &r.group })
                    .map(|s| s.chars().count())
                    .max()
                    .unwrap_or(0);
                longest.max(col.title.len()).min(45) as u16
            });
            Constraint::Length(w)
        })
        .collect();
    let header = Row::new(COLUMNS.iter().enumerate().map(|(i, col)| {
        let style = if col.sort == Some(app.query.sort.as_str()) {
            Style::new().add_modifier(Modifier::BOLD | Modifier::REVERSED)
        } else {
            Style::new().add_modifier(Modifier::BOLD)
        };
        Cell::from(align(col.title.to_owned(), i)).style(style)
    }));
    let rows = cells
        .into_iter()
        .map(|c| Row::new(c.into_iter().enumerate().map(|(i, s)| align(s, i))));
    frame.render_widget(
        Table::new(rows, widths).header(header).column_spacing(1),
        body,
    );

    let footer = match &app.input {
        Some(text) => Line::from(vec![
            Span::styled("filter: ", Style::new().add_modifier(Modifier::BOLD)),
            Span::raw(format!("{text}_")),
            Span::raw("   (Enter applies, Esc clears)"),
        ]),
        None => Line::from(Span::styled(
            KEYS_HELP,
            Style::new().add_modifier(Modifier::DIM),
        )),
    };
    frame.render_widget(Paragraph::new(footer).wrap(Wrap { trim: true }), foot);
}

/// Text columns left, numbers right.
fn align(s: String, column: usize) -> Line<'static> {
    if column < 2 {
        Line::from(s)
    } else {
        Line::from(s).right_aligned()
    }
}

/// The fetch thread's answer for one API path.
struct Fetched {
    path: String,
    result: Result<Vec<ClientRow>, String>,
    at: SystemTime,
}

fn fetch(source: &crate::views::Source, path: &str) -> anyhow::Result<Vec<ClientRow>> {
    let body = source.get(path)?;
    serde_json::from_str(&body).context("decoding the client rows")
}

/// Answers API paths sent to it, one at a time, until either side hangs up.
fn spawn_fetcher(
    source: crate::views::Source,
) -> anyhow::Result<(mpsc::Sender<String>, mpsc::Receiver<Fetched>)> {
    let (req_tx, req_rx) = mpsc::channel::<String>();
    let (res_tx, res_rx) = mpsc::channel();
    std::thread::Builder::new()
        .name("top-fetch".into())
        .spawn(move || {
            while let Ok(path) = req_rx.recv() {
                let result = fetch(&source, &path).map_err(|e| format!("{e:#}"));
                let at = SystemTime::now();
                if res_tx.send(Fetched { path, result, at }).is_err() {
                    break;
                }
            }
        })
        .context("starting the fetch thread")?;
    Ok((req_tx, res_rx))
}

static STOP: AtomicBool = AtomicBool::new(false);

extern "C" fn on_signal(_: libc::c_int) {
    STOP.store(true, Ordering::Relaxed);
}

/// SIGTERM, SIGHUP and SIGINT end the view through the normal path, restoring the terminal.
fn install_signal_handlers() {
    for sig in [libc::SIGTERM, libc::SIGHUP, libc::SIGINT] {
        // SAFETY: the handler only stores to an atomic, which is async-signal-safe.
        unsafe { libc::signal(sig, on_signal as *const () as libc::sighandler_t) };
    }
}

/// Leaves raw mode and the alternate screen however `run` ends (ratatui's panic hook covers
/// panics as well).
struct RestoreTerminal;

impl Drop for RestoreTerminal {
    fn drop(&mut self) {
        ratatui::restore();
    }
}

/// The screen as plain text: the header line, then the table with aligned columns.
pub fn plain(app: &App, now: SystemTime) -> String {
    let mut lines: Vec<Vec<String>> = vec![COLUMNS.iter().map(|c| c.title.to_owned()).collect()];
    lines.extend(
        app.rows
            .iter()
            .map(|r| row_cells(r, app.query.window, now).to_vec()),
    );
    let mut widths = [0usize; COLUMNS.len()];
    for line in &lines {
        for (w, cell) in widths.iter_mut().zip(line) {
            *w = (*w).max(cell.chars().count());
        }
    }
    let mut out = header_line(app);
    out.push('\n');
    for line in &lines {
        let cells: Vec<String> = line
            .iter()
            .zip(widths)
            .enumerate()
            // Names left-aligned, numbers right-aligned, as on screen.
            .map(|(i, (cell, w))| {
                if i < 2 {
                    format!("{cell:<w$}")
                } else {
                    format!("{cell:>w$}")
                }
            })
            .collect();
        out.push_str(cells.join("  ").trim_end());
        out.push('\n');
    }
    out
}

pub fn run(args: &TopArgs) -> anyhow::Result<()> {
    let by = By::parse(&args.by).context("--by: address, group, identity or forwarded")?;
    let window = match &args.window {
        Some(w) => Some(Window::parse(w).context("--window: 1m, 10m or 1h")?),
        None => None,
    };
    let interval = Duration::from_millis(args.interval_ms);
    let source = crate::views::Source::new(&args.socket, &args.remote)?;
    let mut app = App::new(PathBuf::from(source.label()), interval, by, window);
    // Not a terminal (`sensor top | head`, a log): one snapshot as plain text, like the
    // one-shot views, quiet when the reader has gone.
    if !std::io::stdout().is_terminal() {
        let path = app.api_path();
        let rows = fetch(&source, &path)?;
        let now = SystemTime::now();
        app.apply(&path, Ok(rows), now);
        return crate::stdout::print_out(&plain(&app, now));
    }
    let (requests, results) = spawn_fetcher(source)?;
    install_signal_handlers();

    let _restore = RestoreTerminal;
    let mut terminal = ratatui::try_init().context("setting up the terminal")?;

    let mut in_flight = false;
    let mut want_fetch = true;
    let mut next_due = Instant::now();
    let mut dirty = true;
    while !STOP.load(Ordering::Relaxed) {
        loop {
            match results.try_recv() {
                Ok(f) => {
                    in_flight = false;
                    app.apply(&f.path, f.result, f.at);
                    dirty = true;
                }
                Err(mpsc::TryRecvError::Empty) => break,
                Err(mpsc::TryRecvError::Disconnected) => {
                    anyhow::bail!("the fetch thread stopped")
                }
            }
        }
        let now = Instant::now();
        if !app.paused && now >= next_due {
            want_fetch = true;
        }
        if want_fetch && !in_flight {
            requests
                .send(app.api_path())
                .context("the fetch thread stopped")?;
            in_flight = true;
            want_fetch = false;
            next_due = now + interval;
        }
        if dirty {
            terminal
                .draw(|frame| draw(frame, &mut app))
                .context("drawing")?;
            dirty = false;
        }
        if event::poll(Duration::from_millis(50)).context("reading the terminal")? {
            match event::read().context("reading the terminal")? {
                Event::Key(key) => {
                    dirty = true;
                    match app.handle_key(key) {
                        Action::Quit => break,
                        Action::Refetch => want_fetch = true,
                        Action::Nothing => {}
                    }
                }
                Event::Resize(..) => dirty = true,
                _ => {}
            }
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;

    use ratatui::{Terminal, backend::TestBackend};

    use super::*;
    use crate::model::report::WindowCounts;

    fn key(c: char) -> KeyEvent {
        KeyEvent::new(KeyCode::Char(c), KeyModifiers::NONE)
    }

    fn code(code: KeyCode) -> KeyEvent {
        KeyEvent::new(code, KeyModifiers::NONE)
    }

    fn app() -> App {
        App::new(
            "/run/sensor/sensor.sock".into(),
            Duration::from_secs(1),
            By::Address,
            None,
        )
    }

    fn client(name: &str, requests: u64, bytes_out: u64) -> ClientRow {
        ClientRow {
            client: name.into(),
            group: "10.0.0.0/24".into(),
            identity: None,
            forwarded_for: None,
            requests,
            bytes_in: 2048,
            bytes_out,
            connections: 3,
            events_out: 0,
            distinct_addresses: None,
            open_connections: 1,
            peak_open_connections: 2,
            first_seen: "2026-01-01T00:00:00.000Z".into(),
            last_seen: "2026-01-01T00:01:05.000Z".into(),
            active_seconds: 42,
            out_in_ratio: Some(bytes_out as f64 / 2048.0),
            interval_mean_ms: Some(10.0),
            interval_cv: Some(0.123),
            windows: BTreeMap::from([(
                "1m".to_owned(),
                WindowCounts {
                    requests: 7,
                    bytes_in: 100,
                    bytes_out: 3 * 1024 * 1024,
                    connections: 1,
                    events_out: 0,
                },
            )]),
        }
    }

    #[test]
    fn sort_keys_set_the_sort_field_and_refetch() {
        let mut a = app();
        assert_eq!(a.query.sort, "bytes_out");
        for (k, field) in [
            ('r', "requests"),
            ('i', "bytes_in"),
            ('o', "bytes_out"),
            ('c', "connections"),
            ('n', "open_connections"),
            ('k', "peak_open_connections"),
            ('a', "active_seconds"),
            ('v', "interval_cv"),
            ('t', "out_in_ratio"),
            ('l', "last_seen"),
        ] {
            assert_eq!(a.handle_key(key(k)), Action::Refetch, "{k}");
            assert_eq!(a.query.sort, field, "{k}");
            assert!(a.api_path().contains(&format!("sort={field}")));
        }
        assert_eq!(a.handle_key(key('x')), Action::Nothing);
        assert_eq!(a.query.sort, "last_seen");
    }

    #[test]
    fn arrows_move_the_sort_column_and_wrap() {
        let mut a = app();
        a.handle_key(key('>'));
        assert_eq!(a.query.sort, "connections");
        a.handle_key(code(KeyCode::Left));
        a.handle_key(code(KeyCode::Left));
        assert_eq!(a.query.sort, "bytes_in");
        a.handle_key(key('l'));
        a.handle_key(code(KeyCode::Right));
        assert_eq!(a.query.sort, "client", "wraps to the first sortable column");
        a.handle_key(key('<'));
        assert_eq!(a.query.sort, "last_seen");
    }

    #[test]
    fn window_grouping_pause_and_quit() {
        let mut a = app();
        let mut seen = Vec::new();
        for _ in 0..4 {
            assert_eq!(a.handle_key(key('w')), Action::Refetch);
            seen.push(a.query.window.map_or("total", Window::name));
        }
        assert_eq!(seen, ["1m", "10m", "1h", "total"]);
        a.handle_key(key('w'));
        assert!(a.api_path().contains("window=1m"));

        assert_eq!(a.handle_key(key('g')), Action::Refetch);
        assert_eq!(a.query.by, By::Group);
        assert!(a.api_path().contains("by=group"));
        a.handle_key(key('g'));
        assert_eq!(a.query.by, By::Identity);
        a.handle_key(key('g'));
        assert_eq!(a.query.by, By::Forwarded);
        a.handle_key(key('g'));
        assert_eq!(a.query.by, By::Address);

        assert_eq!(a.handle_key(key('p')), Action::Nothing);
        assert!(a.paused);
        assert!(header_line(&a).contains("PAUSED"));
        assert_eq!(a.handle_key(key('p')), Action::Refetch);
        assert!(!a.paused);

        assert_eq!(a.handle_key(key('q')), Action::Quit);
        assert_eq!(
            a.handle_key(KeyEvent::new(KeyCode::Char('c'), KeyModifiers::CONTROL)),
            Action::Quit
        );
    }

    #[test]
    fn filter_input_takes_every_key_until_enter_or_esc() {
        let mut a = app();
        assert_eq!(a.handle_key(key('/')), Action::Nothing);
        for c in "10.0.q".chars() {
            assert_eq!(a.handle_key(key(c)), Action::Nothing);
        }
        assert_eq!(a.handle_key(code(KeyCode::Backspace)), Action::Nothing);
        assert_eq!(a.input.as_deref(), Some("10.0."));
        assert_eq!(
            a.query.sort, "bytes_out",
            "keys typed into the filter do not sort"
        );
        assert_eq!(a.handle_key(code(KeyCode::Enter)), Action::Refetch);
        assert_eq!(a.input, None);
        assert_eq!(a.query.filter.as_deref(), Some("10.0."));
        assert!(a.api_path().ends_with("filter=10.0."));
        assert!(header_line(&a).contains("filter 10.0."));

        // `/` again starts from the current filter; Esc clears it.
        a.handle_key(key('/'));
        assert_eq!(a.input.as_deref(), Some("10.0."));
        assert_eq!(a.handle_key(code(KeyCode::Esc)), Action::Refetch);
        assert_eq!(a.query.filter, None);
        assert_eq!(a.input, None);

        // An empty filter is no filter; Ctrl-C quits even while typing.
        a.handle_key(key('/'));
        a.handle_key(key(' '));
        a.handle_key(code(KeyCode::Enter));
        assert_eq!(a.query.filter, None);
        a.handle_key(key('/'));
        assert_eq!(
            a.handle_key(KeyEvent::new(KeyCode::Char('c'), KeyModifiers::CONTROL)),
            Action::Quit
        );
    }

    #[test]
    fn scrolling_stays_within_the_rows() {
        let mut a = app();
        a.page = 3;
        let path = a.api_path();
        let rows = (0..10)
            .map(|i| client(&format!("10.0.0.{i}"), i, i))
            .collect();
        a.apply(&path, Ok(rows), SystemTime::now());
        a.handle_key(code(KeyCode::Up));
        assert_eq!(a.scroll, 0);
        a.handle_key(code(KeyCode::Down));
        assert_eq!(a.scroll, 1);
        a.handle_key(code(KeyCode::PageDown));
        assert_eq!(a.scroll, 4);
        a.handle_key(code(KeyCode::PageDown));
        a.handle_key(code(KeyCode::PageDown));
        assert_eq!(a.scroll, 7, "the last page stays full");
        a.handle_key(code(KeyCode::PageUp));
        assert_eq!(a.scroll, 4);
        a.handle_key(code(KeyCode::Home));
        assert_eq!(a.scroll, 0);
        a.handle_key(code(KeyCode::End));
        assert_eq!(a.scroll, 7);
        // Sorting starts from the top again.
        a.handle_key(key('r'));
        assert_eq!(a.scroll, 0);
    }

    #[test]
    fn fetch_results_for_an_old_query_are_ignored_and_errors_keep_rows() {
        let mut a = app();
        let old = a.api_path();
        a.handle_key(key('r'));
        a.apply(&old, Ok(vec![client("10.0.0.1", 1, 1)]), SystemTime::now());
        assert!(a.rows.is_empty());
        assert_eq!(a.refreshed, None);

        let path = a.api_path();
        a.apply(&path, Ok(vec![client("10.0.0.1", 1, 1)]), SystemTime::now());
        assert_eq!(a.rows.len(), 1);
        assert!(a.refreshed.is_some());
        a.apply(
            &path,
            Err("cannot reach the agent".into()),
            SystemTime::now(),
        );
        assert_eq!(a.rows.len(), 1);
        assert_eq!(a.error.as_deref(), Some("cannot reach the agent"));
        a.apply(&path, Ok(vec![]), SystemTime::now());
        assert_eq!(a.error, None);
    }

    #[test]
    fn row_cells_show_totals_or_the_window() {
        let r = client("10.0.0.7", 1500, 5 * 1024 * 1024);
        let now = humantime::parse_rfc3339("2026-01-01T00:02:10Z").expect("time");
        let cells = row_cells(&r, None, now);
        assert_eq!(
            cells,
            [
                "10.0.0.7",
                "10.0.0.0/24",
                "1500",
                "2.0 KiB",
                "5.0 MiB",
                "3",
                "1",
                "2",
                "2560.0",
                "0.12",
                "42",
                "1m05s ago",
            ]
            .map(String::from)
        );
        let w = row_cells(&r, Some(Window::OneMinute), now);
        assert_eq!(&w[2..6], ["7", "100 B", "3.0 MiB", "1"]);
        assert_eq!(w[6], "1", "open connections are not windowed");
        // A window the agent did not report falls back to the totals.
        assert_eq!(row_cells(&r, Some(Window::OneHour), now)[2], "1500");
        let none = ClientRow {
            out_in_ratio: None,
            interval_cv: None,
            ..r
        };
        assert_eq!(&row_cells(&none, None, now)[8..10], ["-", "-"]);
    }

    #[test]
    fn plain_snapshot_has_the_header_the_titles_and_aligned_rows() {
        let mut a = app();
        let now = SystemTime::UNIX_EPOCH + Duration::from_secs(1_767_225_700);
        a.apply(
            &a.api_path(),
            Ok(vec![
                client("10.0.0.1", 5, 10),
                client("10.0.0.22", 12345, 20),
            ]),
            now,
        );
        let text = plain(&a, now);
        let lines: Vec<&str> = text.lines().collect();
        assert_eq!(lines.len(), 4, "{text}");
        assert!(lines[0].starts_with("sensor top | agent "), "{text}");
        assert!(lines[0].contains("| 2 clients |"), "{text}");
        assert!(lines[1].starts_with("CLIENT     GROUP"), "{text}");
        // Numbers end in the same column as their title.
        let end = |l: &str, word: &str| l.find(word).map(|i| i + word.len());
        assert_eq!(end(lines[1], "REQUESTS"), end(lines[2], " 5"));
        assert_eq!(end(lines[1], "REQUESTS"), end(lines[3], "12345"));
    }

    #[test]
    fn ages() {
        let t = |s: &str| humantime::parse_rfc3339(s).expect("time");
        let now = t("2026-01-02T03:04:05Z");
        assert_eq!(age("2026-01-02T03:04:05.000Z", now), "0s ago");
        assert_eq!(age("2026-01-02T03:04:05.900Z", now), "0s ago", "clock skew");
        assert_eq!(age("2026-01-02T02:04:05.000Z", now), "1h00m ago");
        assert_eq!(age("2025-12-31T00:00:00.000Z", now), "2d03h ago");
        assert_eq!(age("garbage", now), "garbage");
    }

    fn screen(app: &mut App, width: u16, height: u16) -> (Vec<String>, ratatui::buffer::Buffer) {
        let mut term = Terminal::new(TestBackend::new(width, height)).expect("terminal");
        term.draw(|f| draw(f, app)).expect("draw");
        let buf = term.backend().buffer().clone();
        let lines = (0..height)
            .map(|y| (0..width).map(|x| buf[(x, y)].symbol()).collect::<String>())
            .collect();
        (lines, buf)
    }

    #[test]
    fn draws_header_rows_and_highlights_the_sort_column() {
        let mut a = app();
        let path = a.api_path();
        a.apply(
            &path,
            Ok(vec![
                client("10.0.0.1", 5, 9_000_000),
                client("10.0.0.22", 900, 10),
            ]),
            SystemTime::now(),
        );
        let (lines, buf) = screen(&mut a, 200, 12);
        assert!(lines[0].starts_with("sensor top | agent /run/sensor/sensor.sock | by address"));
        assert!(lines[0].contains("sort bytes_out"));
        assert!(lines[0].contains("2 clients"));
        assert!(lines[1].trim().is_empty(), "no error");
        let head = &lines[2];
        for col in &COLUMNS {
            assert!(head.contains(col.title), "{} in {head}", col.title);
        }
        assert!(lines[3].starts_with("10.0.0.1 "));
        assert!(lines[3].contains("8.6 MiB"));
        assert!(lines[4].starts_with("10.0.0.22"));
        assert!(
            lines[10].contains("r requests"),
            "help footer: {}",
            lines[10]
        );

        let x = head.find("BYTES_OUT").expect("column") as u16;
        assert!(buf[(x, 2)].modifier.contains(Modifier::REVERSED));
        let x = head.find("REQUESTS").expect("column") as u16;
        assert!(!buf[(x, 2)].modifier.contains(Modifier::REVERSED));

        a.handle_key(key('r'));
        a.handle_key(key('/'));
        a.handle_key(key('9'));
        a.apply(
            &a.api_path(),
            Err("cannot reach the agent at /x".into()),
            SystemTime::now(),
        );
        let (lines, buf) = screen(&mut a, 200, 12);
        let head = &lines[2];
        let x = head.find("REQUESTS").expect("column") as u16;
        assert!(buf[(x, 2)].modifier.contains(Modifier::REVERSED));
        assert!(lines[1].contains("agent unreachable: cannot reach the agent at /x"));
        assert!(lines[10].starts_with("filter: 9_"));
    }
}
