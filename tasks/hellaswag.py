"""HellaSwag: pick the likeliest ending of a caption (ActivityNet, WikiHow). Rowan/hellaswag; rows {ind,
activity_label, ctx_a, ctx_b, ctx, endings: [4 strings], source_id, split, split_type, label: '0'-'3'}."""
import re

HUB = 'Rowan/hellaswag'
SPLIT, FEWSHOT_SPLIT, SAMPLER = 'validation', 'train', 'random_but_itself'  # the test split's labels are hidden


def clean(text):
    """lm-eval-harness's preprocessing: WikiHow's '[title]' marks become sentence ends, other [tags] go."""
    text = text.strip().replace(' [title]', '. ')
    return re.sub(r'\[.*?\]', '', text).replace('  ', ' ')


def example(row):
    context = clean(f"{row['activity_label']}: {row['ctx_a']} {row['ctx_b'].capitalize()}")
    endings = [clean(e) for e in row['endings']]
    return dict(query=context, choices=endings, gold=int(row['label']), description='', question=context,
                options=endings, letters='ABCD')
