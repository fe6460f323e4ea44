import time

from captioning.timing import Stopwatch


def test_a_stopwatch_times_its_block_and_reads_while_running():
    with Stopwatch() as watch:
        time.sleep(0.05)
        midway = watch.elapsed
    assert 0.05 <= midway <= watch.seconds  # sleep never returns early; the clock never runs backwards
    watch.restart()
    assert watch.elapsed < watch.seconds  # a restart starts from zero, the last block's time is kept


def test_a_stopwatch_records_the_time_of_a_block_that_raises():
    watch = Stopwatch()
    try:
        with watch:
            time.sleep(0.02)
            raise ValueError
    except ValueError:
        pass
    assert watch.seconds >= 0.02
